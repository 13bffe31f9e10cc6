"""Dynamic batching: concurrent requests share model calls.

A request hands over a `prepare` step (tokenizing its inputs) and the number of inputs. As soon
as a model worker is free, one task gathers everything queued into a batch; the worker thread
prepares each request of the batch, then runs the model once on all their rows. While the
workers run, new requests queue up, so under load batches grow by themselves and no request
waits on a timer. Tokenizing and the model both run off the event loop, with no thread hop per
request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class QueueFull(Exception):
    """More inputs are waiting than the server accepts; the client should retry later."""


@dataclass
class _Work:
    prepare: Callable[[], Sequence[Any]]  # → rows; may raise (the error goes to this request only)
    n_inputs: int
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Gathers queued requests into batches for `workers` model threads.

    On a CPU, several single-threaded workers running different batches use the cores better
    than one worker whose every op is split across them; on a GPU one worker is right.
    """

    def __init__(
        self,
        run: Callable[[list[Any]], np.ndarray],
        max_inputs: int,
        max_queue_inputs: int,
        workers: int = 1,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.run = run
        self.on_batch = on_batch  # told the number of inputs of each batch (metrics)
        self.max_inputs = max_inputs
        self.max_queue_inputs = max_queue_inputs
        self.workers = max(1, workers)
        self.queued = 0  # inputs admitted and not yet answered
        self.batches = 0  # model batches run, and the inputs in them: their ratio is the mean batch
        self.batched_inputs = 0
        self._queue: asyncio.Queue[_Work] = asyncio.Queue()
        self._model_threads = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="model")
        self._free: asyncio.Semaphore | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()

    @property
    def depth(self) -> int:
        return self.queued

    def start(self) -> None:
        self._free = asyncio.Semaphore(self.workers)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        for task in [self._task, *self._running]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._model_threads.shutdown(wait=False, cancel_futures=True)

    async def submit(self, prepare: Callable[[], Sequence[Any]], n_inputs: int) -> tuple[Sequence[Any], np.ndarray]:
        """Queue a request; returns its prepared rows and the model's output for them."""
        if self.queued + n_inputs > self.max_queue_inputs:
            raise QueueFull(f"{self.queued} inputs are queued (limit {self.max_queue_inputs}); retry shortly")
        fut = asyncio.get_running_loop().create_future()
        self.queued += n_inputs
        self._queue.put_nowait(_Work(prepare, n_inputs, fut))
        return await fut

    async def _loop(self) -> None:
        assert self._free is not None
        loop = asyncio.get_running_loop()
        while True:
            # a worker first: while all are busy, requests pile up and the next batch grows
            await self._free.acquire()
            batch = [await self._queue.get()]
            n = batch[0].n_inputs
            while n < self.max_inputs and not self._queue.empty():
                work = self._queue.get_nowait()
                batch.append(work)
                n += work.n_inputs
            self.batches += 1
            self.batched_inputs += n
            if self.on_batch is not None:
                self.on_batch(n)
            task = loop.create_task(self._run(batch, n))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    def _work(self, batch: list[_Work]) -> tuple[list[Sequence[Any] | BaseException], np.ndarray | Exception]:
        """On a model thread: prepare each request, then one model call for all their rows."""
        prepared: list[Sequence[Any] | BaseException] = []
        for w in batch:
            if w.future.cancelled():
                prepared.append(asyncio.CancelledError())
                continue
            try:
                prepared.append(w.prepare())
            except Exception as e:
                prepared.append(e)
        rows = [r for p in prepared if not isinstance(p, BaseException) for r in p]
        if not rows:
            return prepared, np.zeros((0, 1), dtype=np.float32)
        try:
            return prepared, self.run(rows)
        except Exception as e:
            return prepared, e

    async def _run(self, batch: list[_Work], n: int) -> None:
        assert self._free is not None
        try:
            prepared, result = await asyncio.get_running_loop().run_in_executor(self._model_threads, self._work, batch)
            start = 0
            for w, rows in zip(batch, prepared, strict=True):
                if w.future.done():
                    if not isinstance(rows, BaseException):
                        start += len(rows)
                    continue
                if isinstance(rows, BaseException):
                    w.future.set_exception(rows)
                elif isinstance(result, Exception):
                    w.future.set_exception(result)
                else:
                    w.future.set_result((rows, result[start : start + len(rows)]))
                    start += len(rows)
        finally:
            self.queued -= n
            self._free.release()
