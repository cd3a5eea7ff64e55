"""Dynamic batching on one device: the core of ``specs serve`` (no web framework here).

Requests from many clients arrive on one asyncio event loop. :class:`DynamicBatcher` puts
their pairs in a queue and a single loop task turns the queue into batches: it takes the
first waiting request, adds every request already waiting, and, when requests have been
arriving together (the previous batch held more than one), waits at most ``max_wait_ms``
for more while the batch holds fewer than ``max_batch_pairs`` pairs. A lone client is
therefore never delayed, and a request is never split (one larger than
``max_batch_pairs`` is a batch of its own). Each batch is scored
by one call of ``score`` in **one worker thread**, so the model is used by one thread at a
time and the event loop stays free to accept, answer and refuse requests meanwhile; while
a batch is being scored the next one fills up, so batches grow with the load by
themselves.

Admission is bounded in pairs: a request that would take the pairs admitted and not yet
answered (waiting or being scored) over ``max_queue_pairs`` is refused at once with
:class:`~specs_metric.errors.OverloadedError`, which the service answers with 503 and
``Retry-After``. A server under too much load therefore answers quickly instead of letting
every client wait longer and longer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from specs_metric.errors import OverloadedError, UsageError

# score(images, captions, labels) -> one result per pair
ScoreFn = Callable[[list, list, list], Sequence[object]]


@dataclass
class _Request:
    images: list
    captions: list
    labels: list
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class BatcherStats:
    """What the batcher has done since it started."""

    requests: int = 0
    pairs: int = 0
    batches: int = 0
    largest_batch: int = 0
    rejected: int = 0
    busy_s: float = 0.0  # time the worker thread spent scoring

    def as_dict(self) -> dict:
        out = dict(self.__dict__)
        out["mean_pairs_per_batch"] = self.pairs / self.batches if self.batches else 0.0
        return out


class DynamicBatcher:
    """Merges concurrent requests into batches scored by one worker thread.

    Args:
        score: ``score(images, captions, labels)`` -> one result per pair (called in the
            worker thread).
        max_batch_pairs: pairs per batch (a larger request is a batch of its own).
        max_queue_pairs: pairs admitted and not yet answered; beyond them, ``OverloadedError``.
        max_wait_ms: how long a batch that is not full waits for more requests.
        retry_after_s: the ``Retry-After`` an overloaded server suggests.
    """

    def __init__(
        self,
        score: ScoreFn,
        *,
        max_batch_pairs: int = 64,
        max_queue_pairs: int = 1024,
        max_wait_ms: float = 5.0,
        retry_after_s: int = 1,
    ) -> None:
        if max_batch_pairs < 1 or max_queue_pairs < 1 or max_wait_ms < 0:
            raise UsageError(
                "max_batch_pairs and max_queue_pairs must be >= 1 and max_wait_ms >= 0"
            )
        self.score = score
        self.max_batch_pairs = max_batch_pairs
        self.max_queue_pairs = max_queue_pairs
        self.max_wait = max_wait_ms / 1000
        self.retry_after_s = retry_after_s
        self.admitted = 0  # pairs admitted and not yet answered
        self.stats = BatcherStats()
        self._company = False  # whether the previous batch merged several requests
        self._queue: asyncio.Queue[_Request] | None = None
        self._task: asyncio.Task | None = None
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # --- life cycle (inside the server's event loop) -----------------------------------
    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="specs-model")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # --- requests ---------------------------------------------------------------------
    async def submit(self, images: list, captions: list, labels: list) -> list:
        """Score one request's pairs in the next batch that has room for them.

        Raises:
            OverloadedError: admitting the request would exceed ``max_queue_pairs``.
        """
        n = len(images)
        if self._queue is None:
            raise RuntimeError("DynamicBatcher.submit() before start()")
        if self.admitted + n > self.max_queue_pairs:
            self.stats.rejected += 1
            raise OverloadedError(
                f"overloaded: {self.admitted} pairs admitted, {n} more would exceed the limit "
                f"of {self.max_queue_pairs}; retry after {self.retry_after_s} s"
            )
        self.admitted += n
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(images, captions, labels, future))
        try:
            return await future
        finally:
            self.admitted -= n

    async def _next_batch(self, first: _Request) -> tuple[list[_Request], _Request | None]:
        """``first`` and the requests that join it; the request that did not fit (it
        starts the next batch) or ``None``."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch, size = [first], len(first.images)
        deadline = loop.time() + (self.max_wait if self._company else 0.0)
        while size < self.max_batch_pairs:
            try:
                if self._queue.empty():
                    left = deadline - loop.time()
                    if left <= 0:
                        break
                    item = await asyncio.wait_for(self._queue.get(), left)
                else:
                    item = self._queue.get_nowait()
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            if size + len(item.images) > self.max_batch_pairs:
                self._company = True
                return batch, item
            batch.append(item)
            size += len(item.images)
        self._company = len(batch) > 1
        return batch, None

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        carried: _Request | None = None
        while True:
            first = carried or await self._queue.get()
            batch, carried = await self._next_batch(first)
            live = [r for r in batch if not r.future.done()]  # a client may have gone
            if not live:
                continue
            images = [x for r in live for x in r.images]
            captions = [x for r in live for x in r.captions]
            labels = [x for r in live for x in r.labels]
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self._pool, self.score, images, captions, labels
                )
            except Exception as exc:  # a bug or an exhausted device: fail this batch only
                for r in live:
                    if not r.future.done():
                        r.future.set_exception(exc)
                continue
            finally:
                self.stats.busy_s += time.perf_counter() - started
            self.stats.batches += 1
            self.stats.requests += len(live)
            self.stats.pairs += len(images)
            self.stats.largest_batch = max(self.stats.largest_batch, len(images))
            start = 0
            for r in live:
                end = start + len(r.images)
                if not r.future.done():
                    r.future.set_result(list(results[start:end]))
                start = end
