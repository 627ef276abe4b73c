"""Group commit: one writer thread per store, one transaction (one fsync) per batch.

Every write of the store is a *job*, a function of an open transaction. The
writer thread takes whatever jobs are queued, runs them in one transaction
and commits once; each job's future completes only after that commit, so a
caller never sees a result that is not durable. When one job of a batch
fails, the batch is rolled back and its jobs run again one transaction each,
so one device's conflict never fails another's enrollment.

Queueing in this thread instead of in SQLite's busy handler (which sleeps in
steps of up to 100 ms instead of waking when the lock frees) is also what
keeps the writers of one process in order, so the audit hash chain stays
linear. bench/README.md has the measurements.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, TypeVar

T = TypeVar("T")
Job = Callable[[Any], Any]

# Enough to absorb a burst of 32-64 concurrent enrollments in one commit, small
# enough that one transaction stays a few milliseconds long.
MAX_BATCH = 64


class GroupCommitter:
    def __init__(
        self, begin: Callable[[], AbstractContextManager[Any]], *, max_batch: int = MAX_BATCH
    ) -> None:
        self._begin = begin
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[tuple[Job, Future[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def submit(self, job: Callable[[Any], T]) -> Future[T]:
        """Queue ``job``; its future holds the job's result once committed."""
        future: Future[T] = Future()
        if self._thread is None:
            self._start()
        self._queue.put((job, future))
        return future

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        thread = self._thread
        if thread is not None:
            self._queue.put(None)
            thread.join()
            self._thread = None

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="estkit-store-writer", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._commit(batch)
                    return
                batch.append(item)
            self._commit(batch)

    def _commit(self, batch: list[tuple[Job, Future[Any]]]) -> None:
        try:
            with self._begin() as conn:
                results = [job(conn) for job, _ in batch]
        except BaseException as exc:
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
            else:
                for one in batch:
                    self._commit([one])
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)
