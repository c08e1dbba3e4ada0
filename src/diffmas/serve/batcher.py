"""The request batcher: a bounded queue in front of one worker thread that runs the model.

The event loop only enqueues jobs and awaits their futures; the worker thread takes the oldest job,
waits up to `max_wait_s` for more jobs with the same settings (up to `max_batch_size`), runs them
as one batch and hands each result back to the loop with `call_soon_threadsafe`. A job cancelled
while it waits (its client left, or timed out) leaves the queue at once, so its slot is free; a
job cancelled while its batch runs is dropped when the batch ends, and a batch whose every job is
cancelled stops decoding early.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable

from diffmas.errors import DiffmasError

log = logging.getLogger("diffmas.serve")


class QueueFull(Exception):
    """The queue holds `max_queue` jobs already."""


class ShuttingDown(Exception):
    """The batcher no longer takes or finishes jobs."""


class BatchCancelled(Exception):
    """Raised inside a running batch once every job in it has been cancelled."""


_ids = itertools.count()


@dataclass(eq=False)
class Job:
    """One request waiting for (or in) a batch."""

    key: Hashable  # jobs with equal keys can share a batch
    payload: object  # what the run function needs for this row (question, seed, ...)
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    tokens: asyncio.Queue | None = None  # streaming: text deltas of the final agent, then None
    arrived: float = field(default_factory=time.monotonic)
    started: float | None = None
    cancelled: bool = False
    id: int = field(default_factory=lambda: next(_ids))

    def push_text(self, delta: str) -> None:
        """From the worker thread: one more piece of streamed text."""
        if self.tokens is not None and not self.cancelled:
            self.loop.call_soon_threadsafe(self.tokens.put_nowait, delta)

    def resolve(self, result=None, error: BaseException | None = None) -> None:
        """From the worker thread: the job's result (or error), once."""

        def settle():
            if self.future.done():
                return
            if self.cancelled:  # nobody awaits it: cancel rather than leave an unretrieved exception
                self.future.cancel()
            elif error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more


RunFn = Callable[[list[Job]], list]  # jobs of one batch -> one result per job, in order


class Batcher:
    def __init__(self, run: RunFn, max_batch_size: int, max_wait_s: float, max_queue: int, metrics=None):
        self.run = run
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._pending: list[Job] = []
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._batch_seconds = 1.0  # running mean of a batch's duration, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="diffmas-model", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ event-loop side
    @property
    def queue_length(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise ShuttingDown()
            if len(self._pending) >= self.max_queue:
                raise QueueFull()
            self._pending.append(job)
            self._gauge()
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone (or timed out): free its slot now if it still waits."""
        with self._cond:
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)
                self._gauge()
                self._cond.notify()  # the worker may be filling a batch around this job

    def retry_after_s(self) -> int:
        """A guess at when a slot frees: the batches ahead of a new request times a batch's duration."""
        batches_ahead = len(self._pending) / self.max_batch_size + 1
        return max(1, round(batches_ahead * self._batch_seconds))

    def close(self, grace_s: float) -> None:
        """Stop taking jobs, fail the waiting ones, give the running batch `grace_s` to finish."""
        with self._cond:
            self._stopping = True
            waiting, self._pending = self._pending, []
            self._gauge()
            self._cond.notify_all()
        for job in waiting:
            job.resolve(error=ShuttingDown())
        self._thread.join(timeout=grace_s)
        for job in list(self._running):
            job.resolve(error=ShuttingDown())

    # ------------------------------------------------------------------ worker thread
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run_batch(batch)

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and up to max_batch_size - 1 later ones with its key, after waiting at
        most max_wait_s (from the oldest job's arrival) for the batch to fill."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self._pending[0]
            deadline = first.arrived + self.max_wait_s
            while not self._stopping:
                same = [j for j in self._pending if j.key == first.key]
                left = deadline - time.monotonic()
                if len(same) >= self.max_batch_size or left <= 0 or first not in self._pending:
                    break
                self._cond.wait(timeout=left)
            if self._stopping:
                return None
            if first not in self._pending:  # cancelled while the batch filled: start over
                return []
            batch = [j for j in self._pending if j.key == first.key][: self.max_batch_size]
            for job in batch:
                self._pending.remove(job)
            self._running = batch
            self._gauge()
            return batch

    def _run_batch(self, batch: list[Job]) -> None:
        if not batch:
            return
        started = time.monotonic()
        for job in batch:
            job.started = started
            if self.metrics:
                self.metrics.queue_wait.observe(started - job.arrived)
        if self.metrics:
            self.metrics.batch_size.observe(len(batch))
        try:
            self._deliver(batch, self._run_split(batch))
        finally:
            self._batch_seconds = 0.7 * self._batch_seconds + 0.3 * (time.monotonic() - started)
            with self._cond:
                self._running = []
                self._gauge()

    def _run_split(self, batch: list[Job]) -> list:
        """Results per job; on a user-facing error, each job alone, so one bad request (too long
        for the context, say) fails by itself rather than taking its batch-mates along."""
        try:
            return self.run(batch)
        except BatchCancelled:
            return [BatchCancelled() for _ in batch]
        except DiffmasError as exc:
            if len(batch) == 1:
                return [exc]
            return [self._run_split([job])[0] for job in batch]
        except Exception as exc:  # a bug or a failing engine: the server answers 500, never dies
            log.exception("batch of %d failed", len(batch))
            return [exc for _ in batch]

    def _deliver(self, batch: list[Job], results: list) -> None:
        for job, result in zip(batch, results):
            if isinstance(result, BaseException):
                job.resolve(error=result)
            else:
                job.resolve(result)

    def _gauge(self) -> None:
        if self.metrics:
            self.metrics.queue_length.set(len(self._pending))
            self.metrics.in_flight.set(len(self._running))
