"""Ending the server or one client's connection, for filters such as exitlast,
exitwhen, limit and ip.

``request_shutdown()`` is nbdkit's ``nbdkit_shutdown()``: the server stops
accepting, disconnects the clients still connected and exits with status 0.
A running server registers how it shuts down (``on_shutdown_request``, which
``pynbd.server`` calls for every server it makes, embedded ones included);
with none registered it sends SIGTERM to its own process, the signal ``pynbd
serve`` handles that way. Either may be called from any thread (a request, a
close, a filter's polling thread).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from .connection import OpenContext

log = logging.getLogger("pynbd.backend.shutdown")

_HANDLERS: list[Callable[[], None]] = []  # the running server's shutdown, if one registered


def on_shutdown_request(handler: Callable[[], None]) -> Callable[[], None]:
    """Make ``handler`` what ``request_shutdown`` calls; returns the function that undoes it."""
    _HANDLERS.append(handler)
    return lambda: _HANDLERS.remove(handler) if handler in _HANDLERS else None


def request_shutdown(reason: str) -> None:
    """Make the server exit; ``reason`` is logged."""
    log.info("%s: shutting down the server", reason)
    if _HANDLERS:
        _HANDLERS[-1]()
    else:
        os.kill(os.getpid(), signal.SIGTERM)


def sleep(ctx: OpenContext, seconds: float) -> None:
    """Sleep for a request of the client ``ctx`` was opened for (nbdkit's
    ``nbdkit_nanosleep``): raise OSError(ESHUTDOWN) early if the client
    disconnects or the server shuts down meanwhile."""
    ending = ctx.extra.get("ending")
    if not isinstance(ending, threading.Event):  # not opened by a server session
        time.sleep(seconds)
    elif ending.wait(seconds):
        raise OSError(errno.ESHUTDOWN, "the client disconnected or the server is shutting down")


def disconnect_client(ctx: OpenContext) -> None:
    """Drop the client ``ctx`` was opened for (nbdkit's ``nbdkit_disconnect``):
    the server stops reading its requests and closes the connection. A
    caller usually raises an error for the request or open it is in, too."""
    disconnect = ctx.extra.get("disconnect")
    if disconnect is not None:
        disconnect()
