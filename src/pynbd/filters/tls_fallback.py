"""tls-fallback: serve a harmless notice to clients that did not start TLS.

    pynbd serve --tls=on --tls-certificates=/etc/pki/pynbd --filter=tls-fallback file disk.img

With ``--tls=on`` (TLS allowed, not required) a client that negotiates TLS
gets the export below as usual. A plaintext client gets, whatever export
name it asked for, one read-only 512-byte export holding a message ("This
NBD server requires TLS authentication before it will serve useful data.")
and listing shows only that export; the layers below are never opened for
it, so a plaintext client cannot make them do work. A kinder failure than
``--tls=require``, which refuses such clients outright.

Parameters
    tlsreadme=MESSAGE   the message (cut to 512 bytes, padded with zero bytes)

Put this filter first, so that no other filter does work for plaintext clients.
"""

from __future__ import annotations

from collections.abc import Callable

from ..backend import Connection, Export, Filter, OpenContext, Param

SIZE = 512
MESSAGE = "This NBD server requires TLS authentication before it will serve useful data.\n"


class Notice(Connection):
    """The plaintext client's export: the message, read-only."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def get_size(self) -> int:
        return SIZE

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        buf[:] = self.data[offset:offset + len(buf)]


class TlsFallbackFilter(Filter):
    short_requests = True
    name = "tls-fallback"
    params = (Param("tlsreadme", "str", "the message plaintext clients read", default=MESSAGE),)
    tlsreadme: str

    def config_complete(self) -> None:
        self.notice = self.tlsreadme.encode()[:SIZE].ljust(SIZE, b"\0")

    def list_exports(self, next_list: Callable[[OpenContext], list[Export]],
                     ctx: OpenContext) -> list[Export]:
        return next_list(ctx) if ctx.tls else [Export("")]

    def default_export(self, next_default: Callable[[OpenContext], str], ctx: OpenContext) -> str:
        return next_default(ctx) if ctx.tls else ""

    def list_meta_contexts(self, next_list: Callable[[OpenContext], list[str]],
                           ctx: OpenContext) -> list[str]:
        return next_list(ctx) if ctx.tls else []

    def open(self, next_open: Callable[[OpenContext], Connection], ctx: OpenContext) -> Connection:
        if not ctx.tls:
            return Notice(self.notice)
        return super().open(next_open, ctx)
