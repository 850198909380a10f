"""WorkerPool: the only place where threads for device work are created.

Semantics follow QEMU's ``util/thread-pool.c`` as used by multifd device state:

* ``submit(fn, *args)`` queues a job; up to ``max_workers`` threads run queued jobs FIFO.
* ``submit_immediate(fn, *args)`` must start at once: the thread cap is raised to the
  number of outstanding jobs, so every queued job (this one included) has its own thread.
* ``wait()`` returns when every job submitted so far has finished and re-raises the first
  job error as :class:`WorkerError` naming the job.
* ``abort()`` sets a flag that long jobs poll with ``check_abort()`` (raising
  :class:`Aborted`); queued jobs that have not started are dropped. A job that ends with
  ``Aborted`` is not an error. By default the first job error also aborts the pool, so
  sibling save/load jobs stop early.
* ``close()`` finishes outstanding jobs and joins every thread (threads are named
  ``{name}-N``), so a pool never leaks threads.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Aborted", "Job", "WorkerError", "WorkerPool"]


class Aborted(Exception):
    """Raised by ``WorkerPool.check_abort()`` once the pool has been aborted."""


class WorkerError(Exception):
    """A pool job failed; ``job`` names it and ``__cause__`` is the original error."""

    def __init__(self, job: str, cause: BaseException) -> None:
        self.job = job
        self.cause = cause
        super().__init__(f"worker job {job!r} failed: {type(cause).__name__}: {cause}")


class Job:
    """Handle for one submitted job."""

    __slots__ = ("_done", "_exc", "_result", "aborted", "args", "fn", "name")

    def __init__(self, name: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.name = name
        self.fn = fn
        self.args = args
        self.aborted = False
        self._done = threading.Event()
        self._result: Any = None
        self._exc: BaseException | None = None

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def exception(self) -> BaseException | None:
        return self._exc

    def result(self, timeout: float | None = None) -> Any:
        """The job's return value; raises WorkerError if it failed, Aborted if dropped."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"worker job {self.name!r} still running")
        if self._exc is not None:
            if isinstance(self._exc, Aborted):
                raise Aborted(f"worker job {self.name!r} aborted") from self._exc
            raise WorkerError(self.name, self._exc) from self._exc
        if self.aborted:
            raise Aborted(f"worker job {self.name!r} aborted before it started")
        return self._result

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<Job {self.name!r} {state}>"


class WorkerPool:
    """A small thread pool with QEMU thread-pool semantics (see module docstring)."""

    def __init__(self, name: str, max_workers: int = 4, *, abort_on_error: bool = True) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        self.name = name
        self.max_workers = max_workers
        self.abort_on_error = abort_on_error
        self._cap = max_workers
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._outstanding = 0  # queued + running
        self._closing = False
        self._closed = False
        self._abort = threading.Event()
        self._first_error: Job | None = None
        self._seq = itertools.count()
        self._job_seq = itertools.count()

    # -- abort flag ------------------------------------------------------------------------

    @property
    def aborted(self) -> bool:
        return self._abort.is_set()

    @property
    def abort_event(self) -> threading.Event:
        """The event jobs may wait on / poll; set by :meth:`abort`."""
        return self._abort

    def check_abort(self) -> None:
        """Raise :class:`Aborted` if the pool has been aborted (jobs call this often)."""
        if self._abort.is_set():
            raise Aborted(f"worker pool {self.name!r} aborted")

    def abort(self) -> None:
        """Ask running jobs to stop and drop jobs that have not started."""
        with self._cond:
            self._abort.set()
            while self._queue:
                job = self._queue.popleft()
                job.aborted = True
                self._outstanding -= 1
                job._done.set()
            self._cond.notify_all()

    # -- submission ------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> Job:
        """Queue ``fn(*args)``; it runs when one of at most ``max_workers`` threads is free."""
        return self._submit(fn, args, name, immediate=False)

    def submit_immediate(
        self, fn: Callable[..., Any], *args: Any, name: str | None = None
    ) -> Job:
        """Run ``fn(*args)`` at once in its own thread (raises the cap to outstanding jobs)."""
        return self._submit(fn, args, name, immediate=True)

    def _submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], name: str | None, *, immediate: bool
    ) -> Job:
        label = name or getattr(fn, "__qualname__", None) or repr(fn)
        job = Job(f"{label}#{next(self._job_seq)}" if name is None else label, fn, args)
        with self._cond:
            if self._closing:
                raise RuntimeError(f"worker pool {self.name!r} is closed")
            if self._abort.is_set():
                job.aborted = True
                job._done.set()
                return job
            self._queue.append(job)
            self._outstanding += 1
            if immediate:
                self._cap = max(self._cap, self._outstanding)
            while len(self._queue) > self._idle and len(self._threads) < self._cap:
                self._spawn()
            self._cond.notify()
        return job

    def _spawn(self) -> None:
        thread = threading.Thread(
            target=self._worker, name=f"{self.name}-{next(self._seq)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _worker(self) -> None:
        while True:
            with self._cond:
                self._idle += 1
                while not self._queue and not self._closing:
                    self._cond.wait()
                self._idle -= 1
                if not self._queue:
                    return  # closing and nothing left
                job = self._queue.popleft()
            self._run(job)

    def _run(self, job: Job) -> None:
        try:
            job._result = job.fn(*job.args)
        except BaseException as exc:  # reported through wait()/result()
            job._exc = exc
        finally:
            job.fn = _finished  # drop references held by the job
            job.args = ()
        failed = job._exc is not None and not isinstance(job._exc, Aborted)
        with self._cond:
            if failed and self._first_error is None:
                self._first_error = job
            self._outstanding -= 1
            job._done.set()
            self._cond.notify_all()
        if failed and self.abort_on_error:
            self.abort()

    # -- waiting and shutdown ----------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Jobs queued or running."""
        with self._cond:
            return self._outstanding

    def wait(self, timeout: float | None = None) -> None:
        """Block until every job finished; raise the first job error as WorkerError.

        The reported error is cleared, so a later ``wait()`` only reports new failures.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._outstanding:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(
                        f"worker pool {self.name!r}: {self._outstanding} job(s) still running"
                    )
                self._cond.wait(left)
            job, self._first_error = self._first_error, None
        if job is not None and job._exc is not None:
            raise WorkerError(job.name, job._exc) from job._exc

    def close(self, timeout: float | None = None) -> None:
        """Let outstanding jobs finish, then join every thread. Idempotent.

        Errors are not raised here (call :meth:`wait` first to see them).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            threads = list(self._threads)
        for thread in threads:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(left)
            if thread.is_alive():
                raise TimeoutError(f"worker thread {thread.name} did not finish")
        with self._cond:
            self._threads.clear()
            self._closed = True

    @property
    def threads(self) -> list[threading.Thread]:
        """The pool's live threads (for tests and diagnostics)."""
        with self._cond:
            return [t for t in self._threads if t.is_alive()]

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()
        self.close()

    def __repr__(self) -> str:
        return (
            f"<WorkerPool {self.name!r} threads={len(self._threads)} "
            f"outstanding={self._outstanding} aborted={self.aborted}>"
        )


def _finished(*_args: Any) -> None:
    """Placeholder left in a finished job instead of its callable."""
