"""The work every API family shares: the model and its batcher, the checks on inputs, and the
mapping of model errors to HTTP errors. Routers (routes/*.py) only translate request and
response shapes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast

import numpy as np

from servers.sentence.batching import Batcher, QueueFull
from servers.sentence.encoder import Direction, Encoder, InputTooLong, Row, normalize
from servers.sentence.errors import ApiError, TooLong
from servers.sentence.settings import ServerSettings

log = logging.getLogger("servers.sentence")

T = TypeVar("T")
ModelFactory = Callable[[str, str, str, int, int], Encoder]

LANGCHAIN_HINT = (
    "token ids of another tokenizer (langchain-openai's OpenAIEmbeddings sends OpenAI's cl100k ids by default: "
    "create it with check_embedding_ctx_length=False so that it sends text)"
)


class Engine:
    """The model, loaded in the background so that /health can answer 503 meanwhile."""

    def __init__(self, settings: ServerSettings, model_factory: ModelFactory, observe_batch: Callable[[int], None] | None = None):
        self.settings = settings
        self.model_factory = model_factory
        self.observe_batch = observe_batch
        self.observe_wait: Callable[[float], None] | None = None
        self.model: Encoder | None = None
        self.batcher: Batcher | None = None
        self.ready = False
        self.workers = 1
        self.error: str | None = None
        self.started = time.time()

    def load(self) -> None:
        """Load (and warm up) the model; runs on a thread of its own. The log says where the time
        went: the model (an export found, the tokenizer read), its threads (ONNX Runtime builds
        its session there) and the one warm-up batch."""
        s = self.settings
        t0 = time.perf_counter()
        model = self.model_factory(s.model_path, s.task, s.device, s.max_batch_tokens, s.max_batch_size)
        described = model.describe()  # backend auto: what was chosen
        self.workers = model_workers(s.device, s.model_workers, str(described.get("backend") or s.backend))
        t1 = time.perf_counter()
        set_threads = getattr(model, "set_threads", None)
        if set_threads is not None:
            set_threads(self.workers, s.torch_threads)
        t2 = time.perf_counter()
        if s.warmup:
            model.run(model.tokenize(["warm up the model"] * 2, truncate=True))
        t3 = time.perf_counter()
        self.model = model
        kind = "cross-encoder" if model.cross_encoder else "bi-encoder"
        log.info(
            "model %s loaded on %s in %.2fs (model %.2fs, threads and session %.2fs, warm-up %.2fs; %s); backend %s (%s)",
            s.model_path,
            s.device,
            t3 - t0,
            t1 - t0,
            t2 - t1,
            t3 - t2,
            kind,
            described.get("backend"),
            described.get("backend_reason") or "asked for",
        )

    def start_batcher(self) -> None:
        assert self.model is not None
        s = self.settings
        cpu = s.device == "cpu"
        self.batcher = Batcher(
            self.model.run,
            s.max_batch_size,
            s.max_queue,
            self.workers,
            self.observe_batch,
            max_tokens=s.chunk_tokens or (512 if cpu else 8192),
            on_wait=self.observe_wait,
            express=s.express_workers if s.express_workers is not None else int(cpu),
        )
        self.batcher.start()
        self.ready = True

    def ready_model(self) -> tuple[Encoder, Batcher]:
        if not self.ready or self.model is None or self.batcher is None:
            raise ApiError(
                503, "the model is still loading; retry shortly", type="server_error", code="model_loading", headers={"Retry-After": "1"}
            )
        return self.model, self.batcher

    @property
    def queue_depth(self) -> int:
        return self.batcher.depth if self.batcher is not None else 0

    # ---------------------------------------------------------------- checks
    def check_count(self, n: int, param: str) -> None:
        if n == 0:
            raise ApiError(400, f"{param} must not be empty", param=param, code="empty_input")
        if n > self.settings.max_inputs:
            raise ApiError(
                422, f"{param} has {n} items, more than the limit of {self.settings.max_inputs}", param=param, code="too_many_inputs"
            )

    def check_documents(self, docs: Sequence[str], param: str) -> None:
        """Documents to rank: any text, empty included, but valid Unicode."""
        self.check_count(len(docs), param)
        for i, text in enumerate(docs):
            if text:
                check_text(text, f"{param}[{i}]" if len(docs) > 1 else param, param)

    def check_dimensions(self, model: Encoder, dimensions: int | None) -> None:
        if dimensions is not None and model.dimensions is not None and dimensions > model.dimensions:
            raise ApiError(
                400, f"dimensions is {dimensions}, more than this model's {model.dimensions}", param="dimensions", code="invalid_dimensions"
            )

    def check_texts(self, texts: Sequence[str], param: str) -> None:
        self.check_count(len(texts), param)
        for i, text in enumerate(texts):
            check_text(text, f"{param}[{i}]" if len(texts) > 1 else param, param)

    def rows_from_ids(self, model: Encoder, id_lists: list[list[int]], truncate: bool, direction: Direction = "right") -> list[Row]:
        """Token ids sent by the client: only this model's own tokenization (or with --allow-token-ids)."""
        rows = []
        for i, ids in enumerate(id_lists):
            if not ids:
                raise ValueError(f"input {i} is an empty list of token ids")
            bad = [t for t in ids if t < 0 or t >= model.vocab_size]
            if bad:
                raise ValueError(
                    f"input {i} has token id {bad[0]} outside this model's vocabulary (0-{model.vocab_size - 1}); {LANGCHAIN_HINT}"
                )
            if not self.settings.allow_token_ids:
                framed = model.first_id is not None or model.last_id is not None
                ok = framed and (model.first_id is None or ids[0] == model.first_id) and (model.last_id is None or model.last_id in ids)
                if not ok:
                    frame = (
                        f"starting with {model.first_id} and holding {model.last_id}"
                        if framed
                        else "(this model's tokenizer adds no marks)"
                    )
                    raise ApiError(
                        400,
                        f"input {i}: token ids are accepted only as this model's own tokenization, {frame}; these look like "
                        f"{LANGCHAIN_HINT}, or start the server with --allow-token-ids",
                        param="input",
                        code="foreign_token_ids",
                    )
            if len(ids) > model.max_length:
                if not truncate:
                    raise InputTooLong(i, len(ids), model.max_length)
                rows.append(Row(cut_ids(ids, model.max_length, model.first_id, model.last_id, direction)))
                continue
            rows.append(Row(ids))
        return rows

    # ---------------------------------------------------------------- work
    async def run(self, n_inputs: int, prepare: Callable[[], Sequence[Row]], param: str = "input") -> tuple[Sequence[Row], np.ndarray]:
        """Tokenize (prepare) and run on a model worker; map their errors to HTTP errors."""
        _, batcher = self.ready_model()
        try:
            return await batcher.submit(prepare, n_inputs)
        except QueueFull as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except InputTooLong as e:
            message = (
                f"{param}[{e.index}] has {e.length} tokens, more than this model's limit of {e.limit}; shorten it or send truncate: true"
            )
            raise TooLong(message, param, e.limit) from None
        except ApiError:
            raise
        except ValueError as e:
            raise ApiError(400, str(e), param=param, code="invalid_input") from None

    async def embed_input(
        self, raw: str | list[str] | list[int] | list[list[int]], truncate: bool, param: str, direction: Direction = "right"
    ) -> tuple[np.ndarray, int, int]:
        """An embedding request's input: a string, strings, token ids, or lists of them.
        Returns the vectors, the tokens used and the number of inputs."""
        if isinstance(raw, str):
            batch: list[str] | list[list[int]] = [raw]
        elif raw and all(isinstance(x, int) for x in raw):
            batch = [cast(list[int], raw)]  # one input given as a list of token ids
        else:
            batch = cast(list[str] | list[list[int]], raw)
        self.check_count(len(batch), param)
        if isinstance(batch[0], str):
            texts = batch
            self.check_texts(texts, param)
            vectors, tokens = await self.embed_texts(texts, truncate, param, direction)
        else:
            vectors, tokens = await self.embed_ids(batch, truncate, direction)
        return vectors, tokens, len(batch)

    async def embed_texts(
        self, texts: list[str], truncate: bool, param: str = "input", direction: Direction = "right"
    ) -> tuple[np.ndarray, int]:
        model = self.model_for("embedding")
        texts = bound_length(texts, model.max_length, truncate, param, direction)
        rows, vectors = await self.run(len(texts), lambda: model.tokenize(texts, truncate, direction=direction), param)
        return vectors, sum(len(r.ids) for r in rows)

    async def embed_ids(self, id_lists: list[list[int]], truncate: bool, direction: Direction = "right") -> tuple[np.ndarray, int]:
        model = self.model_for("embedding")
        rows, vectors = await self.run(len(id_lists), lambda: self.rows_from_ids(model, id_lists, truncate, direction))
        return vectors, sum(len(r.ids) for r in rows)

    async def score(
        self,
        query: str,
        docs: list[str],
        truncate: bool,
        max_length: int | None = None,
        param: str = "documents",
        direction: Direction = "right",
    ) -> Scores:
        """Relevance of each document to the query: cross-encoder pair scores, or cosine similarity."""
        model = self.model_for("rerank")
        limit = min(model.max_length, max_length or model.max_length)
        query = bound_length([query], limit, truncate, "query", direction)[0]
        docs = bound_length(docs, limit, truncate, param, direction)
        if model.cross_encoder:
            rows, raw = await self.run(len(docs), lambda: model.tokenize_pairs(query, docs, truncate, max_length, direction), param)
            return Scores(model.activate(raw), raw, sum(len(r.ids) for r in rows))
        rows, vectors = await self.run(len(docs) + 1, lambda: model.tokenize([query, *docs], truncate, max_length, direction), param)
        vectors = normalize(vectors)
        cosine = vectors[1:] @ vectors[0]
        return Scores(cosine, cosine, sum(len(r.ids) for r in rows))

    async def predict_pairs(self, pairs: list[tuple[str, str]], truncate: bool, direction: Direction = "right") -> Scores:
        """Scores of (query, document) pairs, each its own query (TEI's /predict)."""
        model = self.model_for("rerank")
        if not model.cross_encoder:
            raise ApiError(
                400, "predict needs a cross-encoder model; this server reranks by cosine similarity: use /rerank", code="not_supported"
            )

        queries = bound_length([q for q, _ in pairs], model.max_length, truncate, "inputs", direction)
        docs = bound_length([d for _, d in pairs], model.max_length, truncate, "inputs", direction)

        def prepare() -> list[Row]:
            return [row for q, d in zip(queries, docs, strict=True) for row in model.tokenize_pairs(q, [d], truncate, direction=direction)]

        rows, raw = await self.run(len(pairs), prepare, "inputs")
        return Scores(model.activate(raw), raw, sum(len(r.ids) for r in rows))

    def model_for(self, task: str) -> Encoder:
        model, _ = self.ready_model()
        if model.task != task:
            raise ApiError(404, f"this server serves the {model.task} task, not {task}", code="wrong_task")
        return model


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def model_workers(device: str, workers: int | None, backend: str = "torch") -> int:
    """Batches run at once. torch on a CPU: one single-threaded worker per core (separate batches
    on separate cores beat one batch whose every op is split across them); ONNX Runtime and
    OpenVINO: one worker using every core. Two single-threaded ONNX Runtime workers gave more
    bulk throughput on a busy machine, but bulk work then lost a quarter of its pace to queries
    beside it (tests/test_sentence_server.py, the mixed load), where one worker lost 10%
    (README, "The CPU fast path"); on a GPU one."""
    if workers is not None:
        return max(1, workers)
    return min(cores(), 8) if device == "cpu" and not backend.startswith(("onnx", "openvino")) else 1


class Scores:
    """Relevance scores (after the activation), the raw ones (logits), and the tokens used."""

    def __init__(self, scores: np.ndarray, raw: np.ndarray, tokens: int):
        self.scores, self.raw, self.tokens = scores, raw, tokens

    def order(self) -> list[int]:
        return sorted(range(len(self.scores)), key=lambda i: -float(self.scores[i]))


# no tokenizer reads more characters into one token than this (a whole word, at most): a text
# longer than limit × this is over the limit whatever its tokens, and is refused (or cut) unread
CHARS_PER_TOKEN = 32


def bound_length(texts: list[str], limit: int, truncate: bool, param: str, direction: Direction = "right") -> list[str]:
    """Texts no longer than any `limit` tokens could be, judged by their length before tokenizing:
    a 5 MB string is refused at once, or cut to what can be served (its end kept with direction
    left), never tokenized whole."""
    bound = limit * CHARS_PER_TOKEN
    if all(len(t) <= bound for t in texts):
        return texts
    out = []
    for i, text in enumerate(texts):
        if len(text) <= bound:
            out.append(text)
        elif truncate:
            out.append(text[-bound:] if direction == "left" else text[:bound])  # the tokenizer cuts the rest to `limit` tokens
        else:
            where = f"{param}[{i}]" if len(texts) > 1 else param
            raise TooLong(
                f"{where} has {len(text)} characters, more than {limit} tokens can hold (at most {bound} characters are read); "
                "shorten it or send truncate: true",
                param,
                limit,
            )
    return out


def cut_ids(ids: list[int], limit: int, first_id: int | None, last_id: int | None, direction: Direction) -> list[int]:
    """Token ids cut to `limit`, from the end or (left) from the start, this model's marks kept."""
    head = ids[:1] if first_id is not None and ids[0] == first_id else []
    tail = ids[-1:] if last_id is not None and ids[-1] == last_id else []
    body = ids[len(head) : len(ids) - len(tail)]
    keep = max(0, limit - len(head) - len(tail))
    body = body[len(body) - keep :] if direction == "left" else body[:keep]
    return [*head, *body, *tail]


def check_text(text: str, where: str, param: str) -> None:
    if not text:
        raise ApiError(400, f"{where} is an empty string", param=param, code="empty_input")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        # JSON can carry a lone surrogate ("\ud800"); it is not text any tokenizer can read
        raise ApiError(400, f"{where} is not valid Unicode ({e.reason} at position {e.start})", param=param, code="invalid_text") from None


def documents_text(docs: Sequence[Any], rank_fields: list[str] | None) -> list[str]:
    """Cohere documents: strings, {text}, or objects whose rank_fields are ranked. An object with
    neither is ranked as all its fields, one `key: value` line each, as Cohere ranks objects."""
    out = []
    for doc in docs:
        if isinstance(doc, str):
            out.append(doc)
            continue
        fields = doc if isinstance(doc, dict) else doc.model_dump(exclude_none=True)
        text = fields.get("text")
        if rank_fields:
            text = "\n".join(f"{f}: {fields[f]}" for f in rank_fields if f in fields)
        elif not isinstance(text, str):
            text = "\n".join(f"{k}: {v}" for k, v in fields.items())
        out.append(text)
    return out
