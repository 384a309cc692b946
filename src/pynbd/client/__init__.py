"""The NBD client library: one sans-IO core (``pynbd.proto``), one handle, two faces.

- ``AsyncNBD`` / ``aio.connect`` (``pynbd.client.aio``): the handle, shaped
  like libnbd's Python ``nbd.NBD``, for asyncio: many commands in flight on
  one connection, replies matched out of order. Its module's docstring is
  the manual of both faces.
- ``NBD`` / ``sync.connect`` (``pynbd.client.sync``): the same handle,
  blocking and safe to share between threads; generated from ``aio.py`` by
  ``scripts/unasync.py``, so the two have the same methods, arguments,
  return values and exceptions. ``sync.Pipeline`` keeps many commands in
  flight on a blocking connection.
- ``parse_uri`` (``pynbd.client.uri``): NBD URIs; ``split_captive`` finds
  ``[ CMD ... ]`` on a command line.

Errors: ``NBDError`` (an ``OSError`` with the errno) and ``ProtocolError``
(``RemoteProtocolError`` when the server broke the protocol).
"""

from typing import TYPE_CHECKING, Any

from ..proto.errors import ProtocolError
from .captive import split_captive
from .common import (
    CMD_FLAG_DF,
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    CONTEXT_BASE_ALLOCATION,
    SIZE_MAXIMUM,
    SIZE_MINIMUM,
    SIZE_PREFERRED,
    STATE_HOLE,
    STATE_ZERO,
    TLS_ALLOW,
    TLS_DISABLE,
    TLS_REQUIRE,
)
from .errors import NBDError
from .sync import NBD
from .uri import NBDURI, format_uri, is_uri, parse_uri

if TYPE_CHECKING:
    from .aio import AsyncNBD, connect

Error = NBDError  # libnbd's name


def __getattr__(name: str) -> Any:
    """``AsyncNBD`` and ``connect`` import asyncio only when asked for (start-up time)."""
    if name in ("AsyncNBD", "connect"):
        from . import aio
        return getattr(aio, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "NBD", "AsyncNBD", "connect", "NBDError", "Error", "ProtocolError", "NBDURI", "parse_uri",
    "format_uri", "is_uri", "split_captive",
    "CMD_FLAG_DF", "CMD_FLAG_FAST_ZERO", "CMD_FLAG_FUA", "CMD_FLAG_NO_HOLE", "CMD_FLAG_REQ_ONE",
    "CONTEXT_BASE_ALLOCATION", "SIZE_MAXIMUM", "SIZE_MINIMUM", "SIZE_PREFERRED", "STATE_HOLE",
    "STATE_ZERO", "TLS_ALLOW", "TLS_DISABLE", "TLS_REQUIRE",
]
