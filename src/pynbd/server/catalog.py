"""The bridge between the handshake and a plugin stack: listing and opening exports.

The handshake (``proto.server_handshake``) asks with ``ListExports`` and
``OpenExport`` events; the session answers them with a ``StackCatalog``: it
opens the stack for an export name (its top layer a checked ``Layer`` whose
answers are asked once) and turns the answers into the transmission flags
and block sizes the client is sent.
"""

from __future__ import annotations

import dataclasses
import logging

from ..backend import FUA_NONE, ConfigError, OpenContext
from ..backend.connection import Connection
from ..backend.layer import Layer
from ..backend.stack import Stack
from ..proto.constants import DEFAULT_MAX_PAYLOAD
from ..proto.constants import TransmissionFlag as TF
from ..proto.server_handshake import ExportInfo

log = logging.getLogger("pynbd.server")


class UnknownExport(LookupError):
    """The stack serves no export of that name (or refused the name)."""


class StackCatalog:
    """Exports of one stack, as one client may see them."""

    def __init__(self, stack: Stack, ctx: OpenContext, description: str = "") -> None:
        self.stack = stack
        self.ctx = ctx
        self.description = description

    def list_exports(self) -> list[tuple[str, str]]:
        return [(e.name, e.description) for e in self.stack.list_exports(self.ctx)]

    def list_meta_contexts(self, name: str) -> list[str]:
        """The meta contexts export ``name`` answers besides base:allocation
        (none for a name the stack refuses: the client learns that at GO)."""
        ctx = dataclasses.replace(self.ctx, export_name=name or self.stack.default_export(self.ctx))
        try:
            return self.stack.list_meta_contexts(ctx)
        except (LookupError, ConfigError, OSError) as exc:
            log.debug("meta contexts of export %r: %s", name, exc)
            return []

    def open_export(self, name: str) -> tuple[Layer, ExportInfo]:
        """Open the stack for ``name`` ("" is the default export).

        Raises UnknownExport for a name the stack refuses, OSError when
        opening fails.
        """
        if name == "":
            name = self.stack.default_export(self.ctx)
        self.ctx.export_name = name
        try:
            top = self.stack.open(self.ctx)
        except LookupError as exc:
            raise UnknownExport(str(exc) or f"no export named {name!r}") from None
        except ConfigError as exc:
            raise UnknownExport(str(exc)) from None
        except OSError as exc:
            log.error("cannot open export %r: %s", name, exc.strerror or exc)
            raise
        return top, ExportInfo(name=name, size=top.get_size(), flags=export_flags(top, self.ctx.readonly),
                               block_size=block_size(top),
                               description=self.description or top.export_description())


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
