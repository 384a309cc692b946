"""The ``nbdkit`` module seen by nbdkit Python plugins running under pynbd.

When pynbd loads an nbdkit-style Python plugin (``pynbd serve python
script=plugin.py`` or ``pynbd serve plugin.py``) it first installs this
module as ``sys.modules["nbdkit"]``, so the plugin's ``import nbdkit`` works
unmodified. It offers what nbdkit-python-plugin(3) documents:

Functions
    debug(msg)          log ``msg`` at debug level (shown with ``pynbd serve -v``)
    set_error(err)      the errno the client gets when the callback then raises
    parse_size(text)    ``"100M"`` → 104857600 (ValueError if malformed)
    parse_bool(text)    ``"on"`` → True, ``"0"`` → False (ValueError if neither)
    export_name()       the export name the current client asked for
    is_tls()            whether the current client talks over TLS
    shutdown()          ask the server to exit (as SIGTERM would)
    disconnect(force=False)
                        drop the current client; in-flight replies still go out

Constants (nbdkit's values)
    THREAD_MODEL_SERIALIZE_CONNECTIONS 0, _SERIALIZE_ALL_REQUESTS 1,
    _SERIALIZE_REQUESTS 2, _PARALLEL 3
    FLAG_MAY_TRIM 1, FLAG_FUA 2, FLAG_REQ_ONE 4, FLAG_FAST_ZERO 8
    FUA_NONE / FUA_EMULATE / FUA_NATIVE, CACHE_NONE / CACHE_EMULATE /
    CACHE_NATIVE (0, 1, 2), EXTENT_HOLE 1, EXTENT_ZERO 2

``export_name``, ``is_tls`` and ``disconnect`` only make sense inside a
callback serving a client (open, pread, ...); elsewhere they raise
RuntimeError. The error set with ``set_error`` is per thread and is cleared
before every callback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from ..backend import connection as _connection
from ..backend import params as _params
from ..backend.connection import OpenContext as _OpenContext
from ..backend.plugin import ThreadModel as _ThreadModel

THREAD_MODEL_SERIALIZE_CONNECTIONS = int(_ThreadModel.SERIALIZE_CONNECTIONS)
THREAD_MODEL_SERIALIZE_ALL_REQUESTS = int(_ThreadModel.SERIALIZE_ALL_REQUESTS)
THREAD_MODEL_SERIALIZE_REQUESTS = int(_ThreadModel.SERIALIZE_REQUESTS)
THREAD_MODEL_PARALLEL = int(_ThreadModel.PARALLEL)

FLAG_MAY_TRIM = _connection.FLAG_MAY_TRIM
FLAG_FUA = _connection.FLAG_FUA
FLAG_REQ_ONE = _connection.FLAG_REQ_ONE
FLAG_FAST_ZERO = _connection.FLAG_FAST_ZERO

FUA_NONE = _connection.FUA_NONE
FUA_EMULATE = _connection.FUA_EMULATE
FUA_NATIVE = _connection.FUA_NATIVE

CACHE_NONE = _connection.CACHE_NONE
CACHE_EMULATE = _connection.CACHE_EMULATE
CACHE_NATIVE = _connection.CACHE_NATIVE

EXTENT_HOLE = 1
EXTENT_ZERO = 2

_log = logging.getLogger("pynbd.plugins.python")


class _State(threading.local):
    """Per-thread: the errno from set_error and the client being served."""

    error: int = 0
    ctx: _OpenContext | None = None


_state = _State()


def debug(msg: str) -> None:
    """Log a debug message (visible with ``pynbd serve -v``)."""
    _log.debug("%s", msg)


def set_error(err: int) -> None:
    """Record the errno to send the client if the callback raises next."""
    _state.error = int(err)


def parse_size(text: str) -> int:
    """Parse a size with an optional K/M/G/T/P/E suffix into bytes."""
    return _params.parse_size(text)


def parse_bool(text: str) -> bool:
    """Parse 1/true/yes/on or 0/false/no/off."""
    return _params.parse_bool(text)


def _client(what: str) -> _OpenContext:
    ctx = _state.ctx
    if ctx is None:
        raise RuntimeError(f"nbdkit.{what}() called outside a client connection")
    return ctx


def export_name() -> str:
    """The export name the current client requested."""
    return _client("export_name").export_name


def is_tls() -> bool:
    """Whether the current client connected with TLS."""
    return bool(_client("is_tls").tls)


def shutdown() -> None:
    """Ask the server to exit, as SIGTERM does; returns at once."""
    os.kill(os.getpid(), signal.SIGTERM)


def disconnect(force: bool = False) -> None:
    """Disconnect the current client once the requests in flight are answered.

    pynbd always lets replies already being sent finish; ``force`` is
    accepted for nbdkit compatibility.
    """
    stop = _client("disconnect").extra.get("disconnect")
    if stop is None:
        raise RuntimeError("nbdkit.disconnect() is not supported by this server")
    stop()


def install() -> None:
    """Make ``import nbdkit`` return this module."""
    sys.modules["nbdkit"] = sys.modules[__name__]


def begin_callback(ctx: _OpenContext | None) -> None:
    """Called by pynbd before each plugin callback: clear the error, set the client."""
    _state.error = 0
    _state.ctx = ctx


def last_error() -> int:
    """The errno set_error recorded during the current callback (0 if none)."""
    return _state.error
