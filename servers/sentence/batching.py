"""Dynamic batching: concurrent requests share model calls.

One task gathers what is queued — plus, for a very short while, requests already being
tokenized — into one batch as soon as a model worker is free. While the workers run, new
requests queue up, so under load batches grow by themselves and the wait costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np


class QueueFull(Exception):
    """More rows are waiting than the server accepts; the client should retry later."""


@dataclass
class _Work:
    rows: list
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Gathers queued rows into batches for `workers` model threads.

    On a CPU, several single-threaded workers running different batches use the cores better
    than one worker whose every op is split across them; on a GPU one worker is right.
    """

    def __init__(self, run: Callable[[list], np.ndarray], max_rows: int, max_wait_s: float, max_queue_rows: int, workers: int = 1):
        self.run = run
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self.max_queue_rows = max_queue_rows
        self.workers = max(1, workers)
        self.expecting = 0  # requests past validation, being tokenized: worth a short wait
        self.queued_rows = 0
        self._queue: asyncio.Queue[_Work] = asyncio.Queue()
        self._model_threads = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="model")
        self._free: asyncio.Semaphore | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()

    @property
    def depth(self) -> int:
        return self.queued_rows

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

    def admit(self, n_rows: int) -> None:
        """Refuse early (before tokenizing) when the queue is full."""
        if self.queued_rows + n_rows > self.max_queue_rows:
            raise QueueFull(f"{self.queued_rows} inputs are queued (limit {self.max_queue_rows}); retry shortly")

    async def submit(self, rows: list) -> np.ndarray:
        self.admit(len(rows))
        fut = asyncio.get_running_loop().create_future()
        self.queued_rows += len(rows)
        await self._queue.put(_Work(rows, fut))
        return await fut

    async def _loop(self) -> None:
        assert self._free is not None
        loop = asyncio.get_running_loop()
        while True:
            # a worker first: while all are busy, requests pile up and the next batch grows
            await self._free.acquire()
            batch = [await self._queue.get()]
            n = len(batch[0].rows)
            deadline = loop.time() + self.max_wait_s
            while n < self.max_rows:
                if not self._queue.empty():
                    work = self._queue.get_nowait()
                elif self.expecting > 0 and loop.time() < deadline:
                    try:
                        work = await asyncio.wait_for(self._queue.get(), deadline - loop.time())
                    except asyncio.TimeoutError:
                        break
                else:
                    break
                batch.append(work)
                n += len(work.rows)
            task = loop.create_task(self._run(batch, n))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Work], n: int) -> None:
        assert self._free is not None
        rows = [r for w in batch for r in w.rows]
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._model_threads, self.run, rows)
        except Exception as e:  # noqa: BLE001 — fail these requests, keep serving
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(e)
        else:
            start = 0
            for w in batch:
                end = start + len(w.rows)
                if not w.future.done():
                    w.future.set_result(result[start:end])
                start = end
        finally:
            self.queued_rows -= n
            self._free.release()
