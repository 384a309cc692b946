"""The bridge between the handshake and a plugin stack: opening exports.

``StackCatalog`` implements the handshake's ``ExportCatalog`` for one client:
it opens the stack for an export name, asks the top layer what it can do,
and turns the answers into the transmission flags the client is sent.
"""

from __future__ import annotations

import logging

from ..backend import FUA_NONE, ConfigError, OpenContext
from ..backend.connection import Connection
from ..backend.stack import Stack
from ..proto.constants import DEFAULT_MAX_PAYLOAD
from ..proto.constants import TransmissionFlag as TF
from ..proto.server_handshake import ExportInfo, UnknownExport

log = logging.getLogger("pynbd.server")


class StackCatalog:
    """Exports of one stack, as one client may see them."""

    def __init__(self, stack: Stack, ctx: OpenContext, description: str = "") -> None:
        self.stack = stack
        self.ctx = ctx
        self.description = description

    def list_exports(self) -> list[tuple[str, str]]:
        return [(e.name, e.description) for e in self.stack.list_exports(self.ctx)]

    def open_export(self, name: str) -> ExportInfo:
        if name == "":
            name = self.stack.default_export(self.ctx)
        self.ctx.export_name = name
        try:
            conn = self.stack.open(self.ctx)
        except LookupError as exc:
            raise UnknownExport(str(exc) or f"no export named {name!r}") from None
        except ConfigError as exc:
            raise UnknownExport(str(exc)) from None
        except OSError as exc:
            log.error("cannot open export %r: %s", name, exc.strerror or exc)
            raise
        try:
            return ExportInfo(name=name, size=conn.get_size(), flags=export_flags(conn, self.ctx.readonly),
                              block_size=block_size(conn), description=self.description,
                              handle=conn)
        except BaseException:
            conn.close()
            raise

    def close_export(self, info: ExportInfo) -> None:
        conn = info.handle
        if isinstance(conn, Connection):
            conn.close()


def export_flags(conn: Connection, readonly: bool) -> int:
    """Transmission flags for an opened connection."""
    flags = TF.HAS_FLAGS | TF.SEND_DF
    writable = not readonly and conn.can_write()
    if not writable:
        flags |= TF.READ_ONLY
    if conn.can_flush():
        flags |= TF.SEND_FLUSH
    if writable:
        if conn.can_fua() != FUA_NONE:
            flags |= TF.SEND_FUA
        if conn.can_trim():
            flags |= TF.SEND_TRIM
        if conn.can_zero():
            flags |= TF.SEND_WRITE_ZEROES
            if conn.can_fast_zero():
                flags |= TF.SEND_FAST_ZERO
    if conn.is_rotational():
        flags |= TF.ROTATIONAL
    if conn.can_multi_conn():
        flags |= TF.CAN_MULTI_CONN
    if conn.can_cache():
        flags |= TF.SEND_CACHE
    return int(flags)


def block_size(conn: Connection) -> tuple[int, int, int]:
    """(minimum, preferred, maximum) with the server's defaults filled in."""
    minimum, preferred, maximum = conn.block_size()
    minimum = minimum or 1
    preferred = preferred or max(4096, minimum)
    maximum = min(maximum or DEFAULT_MAX_PAYLOAD, DEFAULT_MAX_PAYLOAD)
    return minimum, preferred, maximum
