"""What both faces of the client handle share: settings, the answers of the
handshake, request checks, errors and result shaping. No I/O happens here.

``HandleBase`` is the part of the handle that never waits (settings before
connecting, facts after); the faces (``aio.AsyncNBD`` and the blocking
``NBD`` generated from it) add the methods that talk to the server.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..proto.client_handshake import (
    ClientHandshake,
    Event,
    HandshakeConfig,
    Negotiated,
    OptionDone,
    OptionRefused,
    Ready,
)
from ..proto.client_handshake import State as HandshakeState
from ..proto.client_transmission import Command, Transmission
from ..proto.constants import BASE_ALLOCATION, Cmd, CmdFlag
from ..proto.constants import TransmissionFlag as TF
from .errors import NBDError, nbd_error
from .uri import NBDURI, parse_uri

if TYPE_CHECKING:
    import ssl  # imported when TLS is used (start-up time: ~10 ms)

TLS_DISABLE, TLS_ALLOW, TLS_REQUIRE = 0, 1, 2
SIZE_MINIMUM, SIZE_PREFERRED, SIZE_MAXIMUM = 0, 1, 2
CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_DF = int(CmdFlag.FUA), int(CmdFlag.NO_HOLE), int(CmdFlag.DF)
CMD_FLAG_REQ_ONE, CMD_FLAG_FAST_ZERO = int(CmdFlag.REQ_ONE), int(CmdFlag.FAST_ZERO)
STATE_HOLE, STATE_ZERO = 1, 2
CONTEXT_BASE_ALLOCATION = BASE_ALLOCATION
DEFAULT_CONNECT_TIMEOUT = 30.0

ExtentCallback = Callable[[str, int, list[int], Any], object]
ExportCallback = Callable[[str, str], object]
ContextCallback = Callable[[str], object]
Buffer = bytes | bytearray | memoryview

_CAN = {
    "flush": TF.SEND_FLUSH, "fua": TF.SEND_FUA, "trim": TF.SEND_TRIM,
    "zero": TF.SEND_WRITE_ZEROES, "fast_zero": TF.SEND_FAST_ZERO, "df": TF.SEND_DF,
    "multi_conn": TF.CAN_MULTI_CONN, "cache": TF.SEND_CACHE,
}
# The export flag each command needs (write-type commands also need a writable export).
_NEEDS: dict[int, str] = {Cmd.FLUSH: "flush", Cmd.TRIM: "trim", Cmd.CACHE: "cache",
                          Cmd.WRITE_ZEROES: "zero"}
_WRITES = {Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES}
_CMD_NAME: dict[int, str] = {
    Cmd.READ: "pread", Cmd.WRITE: "pwrite", Cmd.FLUSH: "flush", Cmd.TRIM: "trim",
    Cmd.CACHE: "cache", Cmd.WRITE_ZEROES: "zero", Cmd.BLOCK_STATUS: "block_status"}


class HandleBase:
    """Settings (before connecting) and export facts (after) of one handle."""

    def __init__(self) -> None:
        self.export_name = ""
        self.tls = TLS_DISABLE
        self.tls_certificates: str | None = None
        self.tls_verify_peer = True
        self.request_structured_replies = True
        self.request_extended_headers = True
        self.meta_contexts: list[str] = []
        self.opt_mode = False
        self.full_info = True
        self.connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT
        self.uri: str | None = None
        self._negotiated: Negotiated | None = None
        self._ready = False
        self._hs: ClientHandshake | None = None
        self._server_hostname: str | None = None  # checked against the TLS certificate

    # ------------------------------------------------------------ settings
    def set_export_name(self, name: str) -> None:
        self.export_name = name

    def get_export_name(self) -> str:
        return self.export_name

    def set_tls(self, tls: int) -> None:
        self.tls = tls

    def get_tls(self) -> int:
        return self.tls

    def set_tls_certificates(self, directory: str) -> None:
        self.tls_certificates = directory

    def set_tls_verify_peer(self, verify: bool) -> None:
        self.tls_verify_peer = verify

    def set_request_structured_replies(self, request: bool) -> None:
        self.request_structured_replies = request

    def set_request_extended_headers(self, request: bool) -> None:
        self.request_extended_headers = request

    def set_full_info(self, request: bool) -> None:
        self.full_info = request

    def set_opt_mode(self, enable: bool) -> None:
        self.opt_mode = enable

    def get_opt_mode(self) -> bool:
        return self.opt_mode

    def add_meta_context(self, name: str) -> None:
        self.meta_contexts.append(name)

    def clear_meta_contexts(self) -> None:
        self.meta_contexts.clear()

    def get_nr_meta_contexts(self) -> int:
        return len(self.meta_contexts)

    def get_meta_context(self, i: int) -> str:
        return self.meta_contexts[i]

    def set_connect_timeout(self, seconds: float | None) -> None:
        self.connect_timeout = seconds

    def _handshake_config(self) -> HandshakeConfig:
        return HandshakeConfig(
            export_name=self.export_name, tls=self.tls != TLS_DISABLE,
            tls_required=self.tls == TLS_REQUIRE,
            structured_replies=self.request_structured_replies,
            extended_headers=self.request_extended_headers,
            meta_contexts=list(self.meta_contexts), opt_mode=self.opt_mode,
            full_info=self.full_info)

    def _apply_uri(self, uri: str) -> NBDURI:
        """Parse ``uri`` and take its settings (export name, TLS)."""
        parsed = parse_uri(uri)
        self.uri = uri
        self.export_name = parsed.export_name
        if parsed.tls:
            self.tls = TLS_REQUIRE
        if parsed.tls_certificates:
            self.tls_certificates = parsed.tls_certificates
        self.tls_verify_peer = parsed.tls_verify_peer
        return parsed

    # ----------------------------------------------------------- handshake
    def _tls_context(self) -> tuple[ssl.SSLContext, str | None]:
        """The TLS context and the server name to check (only a TCP host has one)."""
        from .tls import client_context
        host = self._server_hostname
        return client_context(self.tls_certificates, self.tls_verify_peer,
                              check_hostname=host is not None), host

    def _settle(self, event: Event) -> Transmission | None:
        """Take note of a handshake event the face hands back to its caller;
        on Ready, the Transmission the face must start."""
        if isinstance(event, Ready):
            neg = self._negotiated = event.negotiated
            self._ready = True
            return Transmission(neg.structured_replies, neg.extended_headers, neg.meta_contexts)
        if isinstance(event, OptionDone) and isinstance(event.result, Negotiated):
            self._negotiated = event.result  # NBD_OPT_INFO: the facts of the export asked about
        return None

    def _begin_option(self, name: str) -> ClientHandshake:
        """Send option ``name`` (``"opt_go"``, ``"opt_list"`` ...) in option mode."""
        hs = self._negotiating(name)
        hs.set_export_name(self.export_name)
        hs.config.meta_contexts = list(self.meta_contexts)
        getattr(hs, name)()
        return hs

    def _negotiating(self, what: str) -> ClientHandshake:
        """The handshake, which must be waiting in option mode."""
        hs = self._hs
        if hs is None or hs.state is not HandshakeState.NEGOTIATING:
            raise NBDError(errno.EINVAL, f"{what} needs option mode (opt_mode=True, set before connecting)")
        return hs

    # ---------------------------------------------------------------- facts
    @property
    def negotiated(self) -> Negotiated:
        if self._negotiated is None:
            raise NBDError(errno.ENOTCONN, "the handle is not connected")
        return self._negotiated

    def _flag(self, bit: int) -> bool:
        return bool(self.negotiated.flags & bit)

    def get_size(self) -> int:
        return self.negotiated.size

    def is_read_only(self) -> bool:
        return self._flag(TF.READ_ONLY)

    def is_rotational(self) -> bool:
        return self._flag(TF.ROTATIONAL)

    def can_write(self) -> bool:
        return not self.is_read_only()

    def can_flush(self) -> bool:
        return self._flag(TF.SEND_FLUSH)

    def can_fua(self) -> bool:
        return self._flag(TF.SEND_FUA)

    def can_trim(self) -> bool:
        return self._flag(TF.SEND_TRIM)

    def can_zero(self) -> bool:
        return self._flag(TF.SEND_WRITE_ZEROES)

    def can_fast_zero(self) -> bool:
        return self._flag(TF.SEND_FAST_ZERO)

    def can_df(self) -> bool:
        return self._flag(TF.SEND_DF) and self.negotiated.structured_replies

    def can_multi_conn(self) -> bool:
        return self._flag(TF.CAN_MULTI_CONN)

    def can_cache(self) -> bool:
        return self._flag(TF.SEND_CACHE)

    def can_meta_context(self, name: str) -> bool:
        return name in self.negotiated.meta_contexts.values()

    def get_meta_contexts(self) -> list[str]:
        """The meta contexts the server agreed to, in its order."""
        return list(self.negotiated.meta_contexts.values())

    def get_block_size(self, which: int) -> int:
        """SIZE_MINIMUM / SIZE_PREFERRED / SIZE_MAXIMUM, or 0 if the server did not say."""
        sizes = self.negotiated.block_size
        return sizes[which] if sizes else 0

    def get_protocol(self) -> str:
        return self.negotiated.protocol

    def get_tls_negotiated(self) -> bool:
        return self.negotiated.tls

    def get_structured_replies_negotiated(self) -> bool:
        return self.negotiated.structured_replies

    def get_extended_headers_negotiated(self) -> bool:
        return self.negotiated.extended_headers

    def get_canonical_export_name(self) -> str:
        name = self.negotiated.canonical_name
        return self.export_name if name is None else name

    def get_export_description(self) -> str | None:
        return self.negotiated.description

    def is_ready(self) -> bool:
        return self._ready

    # ------------------------------------------------------------- checks
    def check_command(self, cmd: int, offset: int, count: int, flags: int) -> None:
        """Refuse, before sending, what the server said it cannot do (NBDError)."""
        name = _CMD_NAME.get(cmd, str(cmd))
        if not self._ready:
            raise nbd_error(errno.ENOTCONN, name, "the handle is not connected")
        if cmd in _WRITES and self.is_read_only():
            raise nbd_error(errno.EPERM, name, "the export is read-only")
        need = _NEEDS.get(cmd)
        if need and not self._flag(_CAN[need]):
            raise nbd_error(errno.EINVAL, name, f"the server does not support {need}")
        if flags & CMD_FLAG_FUA and not self.can_fua():
            raise nbd_error(errno.EINVAL, name, "the server does not support FUA")
        if cmd == Cmd.BLOCK_STATUS and not self.negotiated.meta_contexts:
            raise nbd_error(errno.ENOTSUP, name, "no meta context was negotiated")
        if offset < 0 or count < 0 or (cmd != Cmd.FLUSH and offset + count > self.get_size()):
            raise nbd_error(errno.EINVAL, name,
                            f"request {offset}+{count} lies beyond the end of the export")


def command_error(command: Command) -> NBDError | None:
    """The exception a failed command raises, or None."""
    if not command.error:
        return None
    name = _CMD_NAME.get(command.cmd, str(command.cmd))
    detail = command.message or os.strerror(command.error)
    return NBDError(command.error, f"{name}: server replied with error: {detail}")


def is_tls(sock: object) -> bool:
    """True for a TLS socket, without importing ssl: none exists before ssl is imported."""
    ssl_module = sys.modules.get("ssl")
    return ssl_module is not None and isinstance(sock, ssl_module.SSLSocket)


def tls_error(exc: ssl.SSLError) -> NBDError:
    return NBDError(errno.ECONNREFUSED, f"TLS handshake failed: {exc.reason or exc}")


def refused_error(refused: OptionRefused) -> NBDError:
    return NBDError(refused.errno, str(refused))


def connect_error(exc: OSError, where: str) -> NBDError:
    """A failed connect or handshake I/O as one line naming the server."""
    if isinstance(exc, NBDError):
        return exc
    if isinstance(exc, TimeoutError):
        return NBDError(errno.ETIMEDOUT, f"connect: {where}: timed out")
    return NBDError(exc.errno or errno.EIO, f"connect: {where}: {exc.strerror or exc}")


def lost_error(exc: OSError, where: str) -> NBDError:
    """A connection that failed in the transmission phase, as one line naming the server."""
    if isinstance(exc, NBDError):
        return exc
    return NBDError(exc.errno or errno.EIO, f"connection to {where} failed: {exc.strerror or exc}")


def closed_error() -> NBDError:
    """What a command on a handle that is not (or no longer) connected raises."""
    return NBDError(errno.ENOTCONN, "the handle is not connected")


def bytes_view(buf: Buffer) -> memoryview:
    """``buf`` as a flat memoryview of bytes (no copy)."""
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def option_result(event: Event) -> list[Any]:
    """The list an NBD_OPT_LIST or NBD_OPT_LIST_META_CONTEXT answer carries."""
    if isinstance(event, OptionDone) and isinstance(event.result, list):
        return event.result
    return []


def extents_by_name(contexts: dict[int, str], command: Command) -> dict[str, list[int]]:
    """A block status result as {context name: [length, flags, ...]}."""
    result: dict[str, list[int]] = {}
    for context_id, entries in command.extents:
        result.setdefault(contexts.get(context_id, str(context_id)), []).extend(entries)
    return result


def call_extent_callback(callback: ExtentCallback, contexts: dict[int, str],
                         command: Command) -> None:
    """Call a libnbd-style ``callback(metacontext, offset, entries, error)`` per chunk."""
    err = ctypes.c_int(command.error)
    for context_id, entries in command.extents:
        callback(contexts.get(context_id, str(context_id)), command.offset, entries, err)


def apply_settings(handle: HandleBase, settings: dict[str, Any]) -> None:
    """Set handle attributes by name (``meta_contexts=[...]``, ``opt_mode=True`` ...)."""
    for name, value in settings.items():
        if name.startswith("_") or not hasattr(handle, name) or callable(getattr(handle, name)):
            raise TypeError(f"unknown handle setting {name!r}")
        setattr(handle, name, list(value) if name == "meta_contexts" else value)
