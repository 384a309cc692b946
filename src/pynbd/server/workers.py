"""Worker threads for stacks whose requests may block.

The connection's reading thread parses requests and submits them here; a
fixed crew of threads (``-t``, default 16) runs them against the stack and
sends each reply itself, so a slow request never holds up the others and
replies go out in completion order. Write payloads are copied out of the
receive buffer on submission, since the reader reuses that buffer at once.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .session import Session

log = logging.getLogger("pynbd.server")

SCRATCH_SIZE = 256 * 1024  # each worker's read buffer; larger reads get their own


class WorkerPool:
    """Runs one session's requests on ``size`` threads."""

    def __init__(self, session: Session, size: int, request_lock: threading.Lock | None) -> None:
        self.session = session
        self.request_lock = request_lock
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self._work, name=f"nbd-worker-{i}", daemon=True)
                        for i in range(size)]
        for thread in self.threads:
            thread.start()

    def submit(self, flags: int, cmd: int, cookie: int, offset: int, length: int,
               payload: memoryview | None, _scratch: bytearray) -> None:
        """Queue a request (same signature as ``Session._execute``)."""
        if payload is not None:
            payload = memoryview(bytearray(payload))
        self.queue.put((flags, cmd, cookie, offset, length, payload))

    def close(self) -> None:
        """Wait for requests in flight, then stop the threads."""
        for _ in self.threads:
            self.queue.put(None)
        for thread in self.threads:
            thread.join()

    def _work(self) -> None:
        from .session import ClientGone

        execute = self.session._execute  # noqa: SLF001
        lock = self.request_lock
        scratch = bytearray(SCRATCH_SIZE)
        while (item := self.queue.get()) is not None:
            try:
                if lock is None:
                    execute(*item, scratch)
                else:
                    with lock:
                        execute(*item, scratch)
            except ClientGone as exc:
                log.debug("client %s: %s", self.session.address, exc)
                self.session._stop()  # noqa: SLF001
