"""Asking the server to exit, for filters such as exitlast and exitwhen.

``request_shutdown()`` is nbdkit's ``nbdkit_shutdown()``: the server stops
accepting, disconnects the clients still connected and exits with status 0.
It sends SIGTERM to the server's own process, the signal ``pynbd serve``
handles that way, so it may be called from any thread (a request, a close,
a filter's polling thread).
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("pynbd.backend.shutdown")


def request_shutdown(reason: str) -> None:
    """Make the server exit; ``reason`` is logged."""
    log.info("%s: shutting down the server", reason)
    os.kill(os.getpid(), signal.SIGTERM)
