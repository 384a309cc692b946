"""Where a thread sleeps until another hands it its completion (the blkio drivers' leaders).

    class Request(Sleeper): ...
    request.sleep()          # the requesting thread, until woken
    request.wake()           # the leader, under the lock the two share

A wake-up given before the thread sleeps is kept, and wake-ups given while
one is pending count once, so a leader may wake a thread as often as it
likes (to hand over its completion, or to make it the next leader).
"""

from __future__ import annotations

import threading


class Sleeper:
    """One thread's sleeping place: a lock held until ``wake`` releases it."""

    __slots__ = ("done", "signalled")

    def __init__(self) -> None:
        self.done = threading.Lock()
        self.done.acquire()
        self.signalled = False  # ``done`` is released (or about to be taken)

    def wake(self) -> None:
        """Wake the sleeping thread (under the owner's lock); a wake-up already pending
        suffices."""
        if not self.signalled:
            self.signalled = True
            self.done.release()

    def sleep(self) -> None:
        """Sleep until woken."""
        self.done.acquire()
        self.signalled = False
