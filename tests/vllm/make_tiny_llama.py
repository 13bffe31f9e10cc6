"""Build a tiny random Llama that vLLM can serve on the CPU: hidden 128, 4 heads (head_dim 32), 2 layers.

python tests/vllm/make_tiny_llama.py OUT_DIR     (run with the vLLM environment's python)
"""

from __future__ import annotations

import sys

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


def main(out: str) -> None:
    words = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(32, 127)]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out)
    config = LlamaConfig(  # type: ignore[call-arg]
        vocab_size=len(vocab), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    print(f"tiny llama written to {out}")


if __name__ == "__main__":
    main(sys.argv[1])
