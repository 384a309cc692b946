"""Ending the server or one client's connection, for filters such as exitlast,
exitwhen, limit and ip.

``request_shutdown()`` is nbdkit's ``nbdkit_shutdown()``: the server stops
accepting, disconnects the clients still connected and exits with status 0.
It sends SIGTERM to the server's own process, the signal ``pynbd serve``
handles that way, so it may be called from any thread (a request, a close,
a filter's polling thread). A server embedded in another program
(``pynbd.serve``) installs no such handler: there the signal's default
action ends the whole program, so filters that call this are for
``pynbd serve``.
"""

from __future__ import annotations

import logging
import os
import signal

from .connection import OpenContext

log = logging.getLogger("pynbd.backend.shutdown")


def request_shutdown(reason: str) -> None:
    """Make the server exit; ``reason`` is logged."""
    log.info("%s: shutting down the server", reason)
    os.kill(os.getpid(), signal.SIGTERM)


def disconnect_client(ctx: OpenContext) -> None:
    """Drop the client ``ctx`` was opened for (nbdkit's ``nbdkit_disconnect``):
    the server stops reading its requests and closes the connection. A
    caller usually raises an error for the request or open it is in, too."""
    disconnect = ctx.extra.get("disconnect")
    if disconnect is not None:
        disconnect()
