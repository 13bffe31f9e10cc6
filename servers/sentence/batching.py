"""Dynamic batching that is fair to small requests and forgets clients that left.

A request hands over a `prepare` step (tokenizing its inputs) and the number of its inputs. It is
prepared on the tokenizer thread, then its rows wait to be run. Whenever a model worker is free,
one batch is gathered **round-robin across the requests that wait**: each contributes a share of
its rows in turn (a one-sentence query all of it), until the batch holds `max_rows` rows or
`max_tokens` tokens. So a large request is split into model-sized chunks and interleaved
with the others: a query never waits behind more than about one chunk per worker, whatever bulk
work is queued, while a lone bulk request still runs in full batches. Under load the batches grow
by themselves; no request waits on a timer.

On a CPU one more worker, the **express lane**, takes only small requests (all of whose rows fit
in one batch), and only while a worker runs a chunk of a large request: so a query starts at once
even while every other worker runs bulk work (a torch call cannot be interrupted, and a query
behind a chunk would wait its whole length). The operating system shares the cores between the
express worker and the others for those few milliseconds. Without bulk work the express worker
stays idle: more workers than cores would only slow the others.

A request whose client went away (its future cancelled) leaves the queue at once: its rows are
never run, in-flight chunks' results are dropped, and the inputs it held no longer count
against the queue limit (so abandoned work never causes a 429 for a live client).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from servers.sentence.encoder import LANE


class QueueFull(Exception):
    """More inputs are waiting than the server accepts; the client should retry later."""


@dataclass(eq=False)
class _Request:
    prepare: Callable[[], Sequence[Any]]  # → rows; may raise (the error goes to this request only)
    n_inputs: int
    future: asyncio.Future = field(repr=False)
    submitted: float = 0.0
    rows: Sequence[Any] = ()
    order: deque[int] = field(default_factory=deque)  # the rows not yet run, shortest first
    done: int = 0  # rows answered
    out: list[Any] = field(default_factory=list)  # each row's output, in row order
    first_run: float | None = None
    small: bool = False  # all its rows fit in one batch: the express lane may take it

    def __repr__(self) -> str:  # never the rows and outputs: a 2048-input request's repr takes seconds
        return f"<request of {self.n_inputs} inputs, {len(self.order)} rows to run>"

    @property
    def finished(self) -> bool:
        return self.future.done()

    def size(self, i: int) -> int:
        ids = getattr(self.rows[i], "ids", None)
        return len(ids) if ids is not None else 1


class Batcher:
    """Fair batches of rows for `workers` model threads.

    On a CPU, several single-threaded workers running different batches use the cores better
    than one worker whose every op is split across them; on a GPU one worker is right.
    """

    def __init__(
        self,
        run: Callable[[list[Any]], np.ndarray],
        max_rows: int,
        max_queue_inputs: int,
        workers: int = 1,
        on_batch: Callable[[int], None] | None = None,
        max_tokens: int = 4096,
        on_wait: Callable[[float], None] | None = None,
        express: int = 0,
        inline_inputs: int = 8,
    ):
        self.run = run
        self.on_batch = on_batch  # told the number of rows of each batch (metrics)
        self.on_wait = on_wait  # told each request's wait from its arrival to its first rows in the model
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.max_queue_inputs = max_queue_inputs
        self.workers = max(1, workers)
        self.express = max(0, express)  # workers for small requests only
        self.inline_inputs = inline_inputs  # requests this small are tokenized at once, not behind bulk ones
        self.queued = 0  # inputs admitted and not yet answered (abandoned ones leave at once)
        self.batches = 0  # model batches run, and the rows in them: their ratio is the mean batch
        self.batched_inputs = 0
        self._ready: deque[_Request] = deque()  # prepared, with rows waiting to run
        self._model_threads = ThreadPoolExecutor(max_workers=self.workers + self.express, thread_name_prefix="model")
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._free = self.workers
        self._express_free = self.express
        self._bulk_running = 0  # batches running that hold rows of a large request
        self._running: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def depth(self) -> int:
        return self.queued

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        for task in list(self._running):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._model_threads.shutdown(wait=False, cancel_futures=True)
        self._tokenizer.shutdown(wait=False, cancel_futures=True)

    async def submit(self, prepare: Callable[[], Sequence[Any]], n_inputs: int) -> tuple[Sequence[Any], np.ndarray]:
        """Queue a request; returns its prepared rows and the model's output for them."""
        if self.queued + n_inputs > self.max_queue_inputs:
            raise QueueFull(f"{self.queued} inputs are queued (limit {self.max_queue_inputs}); retry shortly")
        loop = asyncio.get_running_loop()
        req = _Request(prepare, n_inputs, loop.create_future(), submitted=time.perf_counter())
        self.queued += n_inputs
        try:
            try:
                if n_inputs <= self.inline_inputs:  # a query: microseconds, never behind a bulk request's tokenizing
                    req.rows = self._prepare(req)
                else:
                    req.rows = await loop.run_in_executor(self._tokenizer, self._prepare, req)
            except Exception as e:
                req.future.set_exception(e)
            if not req.finished:
                if len(req.rows) == 0:
                    req.future.set_result((req.rows, np.zeros((0, 1), dtype=np.float32)))
                else:
                    req.order = deque(sorted(range(len(req.rows)), key=req.size))
                    req.out = [None] * len(req.rows)
                    req.small = len(req.rows) <= self.max_rows and sum(map(req.size, req.order)) <= self.max_tokens
                    self._ready.append(req)
                    self._dispatch()
            return await req.future
        finally:
            self._leave(req)

    def _prepare(self, req: _Request) -> Sequence[Any]:
        if req.finished:  # cancelled while it waited for the tokenizer
            return ()
        return req.prepare()

    def _leave(self, req: _Request) -> None:
        """A request answered, failed or abandoned: it holds no place in the queue any more."""
        if req.n_inputs:
            self.queued -= req.n_inputs
            req.n_inputs = 0
        req.order = deque()
        if not req.future.done():
            req.future.cancel()
        if any(r is req for r in self._ready):
            self._ready.remove(req)

    # ---------------------------------------------------------------- scheduling
    def _dispatch(self) -> None:
        """While a worker is free and rows wait: gather a fair batch and run it; while an express
        worker is free and small requests wait, run them there."""
        while self._free > 0:
            batch = self._gather(small_only=False)
            if not batch:
                break
            self._free -= 1
            self._start(batch, express=False)
        while self._express_free > 0 and self._bulk_running > 0:  # only while a worker is held by bulk work
            batch = self._gather(small_only=True)
            if not batch:
                break
            self._express_free -= 1
            self._start(batch, express=True)

    def _start(self, batch: list[tuple[_Request, int]], express: bool) -> None:
        bulk = any(not req.small for req, _ in batch)
        self._bulk_running += bulk
        self.batches += 1
        self.batched_inputs += len(batch)
        if self.on_batch is not None:
            self.on_batch(len(batch))
        assert self._loop is not None
        task = self._loop.create_task(self._run(batch, express, bulk))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def _gather(self, small_only: bool) -> list[tuple[_Request, int]]:
        """Rows round-robin across waiting requests: a small share each per turn, until full."""
        self._ready = deque(r for r in self._ready if r.order and not r.finished)
        live = [r for r in self._ready if r.small] if small_only else list(self._ready)
        if not live:
            return []
        batch: list[tuple[_Request, int]] = []
        tokens, share = 0, max(1, self.max_rows // (2 * len(live)))
        while len(batch) < self.max_rows:
            took = False
            for req in live:
                for _ in range(share):
                    if not req.order or len(batch) >= self.max_rows:
                        break
                    i = req.order[0]
                    # the rows' own tokens: the model pads each group of like lengths only to its
                    # own longest (tokenization.run_sorted), so one long row among short ones
                    # costs its own length, not the batch's width
                    if batch and tokens + req.size(i) > self.max_tokens:
                        break
                    req.order.popleft()
                    tokens += req.size(i)
                    batch.append((req, i))
                    took = True
            if not took:
                break
        self._ready.rotate(-1)  # the next batch starts with the next request: nobody always goes first
        now = time.perf_counter()
        for req, _ in batch:
            if req.first_run is None:
                req.first_run = now
                if self.on_wait is not None:
                    self.on_wait(now - req.submitted)
        return batch

    async def _run(self, batch: list[tuple[_Request, int]], express: bool, bulk: bool) -> None:
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._model_threads, self._work, batch, express)
            for k, (req, i) in enumerate(batch):
                if req.finished:
                    continue  # abandoned meanwhile: its result is dropped
                if isinstance(result, Exception):
                    req.future.set_exception(result)
                    continue
                req.out[i] = result[k]
                req.done += 1
                if req.done == len(req.rows):
                    req.future.set_result((req.rows, np.stack(req.out)))
        finally:
            self._bulk_running -= bulk
            if express:
                self._express_free += 1
            else:
                self._free += 1
            self._dispatch()

    def _work(self, batch: list[tuple[_Request, int]], express: bool = False) -> np.ndarray | Exception:
        """On a model thread: one model call for the batch's rows, those of live requests only
        (checked just before the call: a client may have left since the batch was gathered)."""
        live = [k for k, (req, _) in enumerate(batch) if not req.finished]
        if not live:
            return np.zeros((len(batch), 1), dtype=np.float32)
        LANE.express = express
        try:
            out = self.run([batch[k][0].rows[batch[k][1]] for k in live])
        except Exception as e:
            return e
        finally:
            LANE.express = False
        if len(live) == len(batch):
            return out
        full = np.zeros((len(batch), *out.shape[1:]), dtype=out.dtype)
        full[live] = out
        return full
