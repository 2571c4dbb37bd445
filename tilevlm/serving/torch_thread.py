"""The server's one thread for torch work: the model's load, every request's tiles and every
decode step run on it, one after another.

Why one thread: ATen runs a parallel region on an OpenMP team that belongs to the calling thread.
While a second thread that ran one is alive (a web worker that made a request's tiles, say),
libgomp manages more threads than there are cores and stops spin-waiting between regions, so
each of a decode step's ~200 small matrix products waits for its team to be woken: the step
gets markedly slower on a CPU (docs/performance.md, "One thread for torch"). On one thread, the
engine's step costs what `generate`'s does.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class TorchThread:
    """One daemon thread (it never holds up the process's exit, not even mid-load); jobs run in
    the order they were handed in."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._work, name="tilevlm-torch", daemon=True).start()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue `fn(*args)`; its outcome comes back on the future."""
        future: Future[T] = Future()
        self._jobs.put((future, fn, args))
        return future

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the thread and wait for it (from any other thread)."""
        return self.submit(fn, *args).result()

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the thread without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def shutdown(self) -> None:
        """End the thread once the jobs already queued have run."""
        self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # the caller gets it, the thread goes on
                future.set_exception(e)
