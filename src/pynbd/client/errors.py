"""Exceptions of the client library.

``NBDError`` is an ``OSError``: ``exc.errno`` is the errno the server sent
(or the one the library chose, EINVAL for a bad URI, say) and ``str(exc)``
one line for the user. ``ProtocolError`` (from ``pynbd.proto.errors``) is
about the protocol itself: ``RemoteProtocolError`` when the server broke it
(the handle is closed afterwards), ``LocalProtocolError`` when the client
misused its own protocol machine (a bug).
"""

from __future__ import annotations

import errno as _errno
import os

from ..proto.errors import ProtocolError

__all__ = ["NBDError", "ProtocolError", "nbd_error"]


class NBDError(OSError):
    """An NBD command or connection failed; ``errno`` says why."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)
        self.message = message

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno or 0)
        return f"{self.message} ({name})" if name else self.message

    @property
    def errnum(self) -> int:
        """libnbd's name for the errno."""
        return self.errno or 0

    @property
    def string(self) -> str:
        return self.message


def nbd_error(err: int, what: str, detail: str = "") -> NBDError:
    """``what: detail`` or ``what: strerror`` as an NBDError."""
    return NBDError(err, f"{what}: {detail or os.strerror(err)}")
