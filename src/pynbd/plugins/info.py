"""info: a disk that holds what the server knows about the client.

    pynbd serve info                        # the export name, reflected
    pynbd serve info mode=base64exportname  # the export name, base64-decoded
    pynbd serve info address                # the client's address and port
    pynbd serve info time                   # the server's wall clock
    pynbd serve info uptime                 # time since the server started
    pynbd serve info conntime               # time since this client connected

Parameters
    [mode=]MODE   exportname (default), base64exportname, address, time,
                  uptime or conntime

exportname: the disk is the bytes of the export name the client asked for
(UTF-8), so nbd://host/hello is a 5-byte disk reading "hello".
base64exportname: the same with the name base64-decoded, so any bytes can
be sent; a name that is not base64 is refused as an unknown export.
address: "127.0.0.1:40000" or "[::1]:40000" for TCP clients, "unix" on a
Unix socket (the server's path is not revealed).
time, uptime, conntime: a 12-byte disk read afresh on every request:
seconds as a 64-bit big-endian integer, then microseconds as a 32-bit
big-endian integer. Read all 12 bytes in one request to get a consistent
value. uptime and conntime use a monotonic clock, so they never jump when
the wall clock is changed.

The disk is read-only (put a cow filter over it to write).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable

from ..backend import Connection, OpenContext, Param, Plugin

MODES = ("exportname", "base64exportname", "address", "time", "uptime", "conntime")
CLOCK_SIZE = 12


def encode_clock(seconds: float) -> bytes:
    """12 bytes: whole seconds (be64) and microseconds (be32)."""
    micros = int(seconds * 1_000_000)
    whole, frac = divmod(micros, 1_000_000)
    return whole.to_bytes(8, "big") + frac.to_bytes(4, "big")


def format_address(address: object) -> str:
    """How a client address reads on the disk."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if len(address) == 4 or ":" in str(host) else f"{host}:{port}"
    return "unix"


class BytesDisk(Connection):
    """A small read-only disk of fixed bytes."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def get_size(self) -> int:
        return len(self.data)

    def can_multi_conn(self) -> bool:
        return True

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        buf[:] = self.data[offset:offset + len(buf)]


class ClockDisk(Connection):
    """12 bytes that are the value of ``clock()`` at each read."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock

    def get_size(self) -> int:
        return CLOCK_SIZE

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        buf[:] = encode_clock(self.clock())[offset:offset + len(buf)]


class InfoPlugin(Plugin):
    short_requests = True
    name = "info"
    magic_param = "mode"
    params = (Param("mode", "str", "what the disk holds", default="exportname", choices=MODES),)
    mode: str

    def config_complete(self) -> None:
        self.started = time.monotonic()

    def dump_plugin(self) -> list[str]:
        return ["info_address=yes"]

    def open(self, ctx: OpenContext) -> Connection:
        if self.mode == "exportname":
            return BytesDisk(ctx.export_name.encode("utf-8"))
        if self.mode == "base64exportname":
            try:
                return BytesDisk(base64.b64decode(ctx.export_name, validate=True))
            except (binascii.Error, ValueError):
                raise LookupError(f"info: export name {ctx.export_name!r} is not base64") from None
        if self.mode == "address":
            return BytesDisk(format_address(ctx.client_address).encode())
        if self.mode == "time":
            return ClockDisk(time.time)
        origin = self.started if self.mode == "uptime" else time.monotonic()
        return ClockDisk(lambda: time.monotonic() - origin)
