"""A byte-level NBD client for tests that must send what real clients never do.

Messages are packed here with ``struct`` straight from doc/proto.md, not with
pynbd's own encoders, so a mistake in ``pynbd.proto.wire`` cannot hide itself.

    with RawClient.connect(path) as c:
        c.handshake()                    # fixed newstyle, NBD_OPT_GO ""
        c.send_request(CMD_READ, 0, 512)
        reply = c.read_simple_reply()
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
EXT_REQUEST_MAGIC = 0x21E41C71
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
EXT_REPLY_MAGIC = 0x6E8A278C

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META, OPT_SET_META, OPT_EXTENDED_HEADERS = 8, 9, 10, 11
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_INVALID = 2**31 + 1, 2**31 + 3
REP_ERR_TLS_REQD, REP_ERR_UNKNOWN, REP_ERR_TOO_BIG, REP_ERR_EXT_HEADER_REQD = (
    2**31 + 5, 2**31 + 6, 2**31 + 9, 2**31 + 10)

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_ZERO, CMD_BLOCK_STATUS = range(8)
F_FUA, F_NO_HOLE, F_DF, F_REQ_ONE, F_FAST_ZERO, F_PAYLOAD_LEN = 1, 2, 4, 8, 16, 32
FLAG_READ_ONLY, FLAG_SEND_DF = 1 << 1, 1 << 7
TYPE_NONE, TYPE_OFFSET_DATA, TYPE_OFFSET_HOLE = 0, 1, 2
TYPE_BLOCK_STATUS, TYPE_BLOCK_STATUS_EXT, TYPE_ERROR = 5, 6, 2**15 + 1
EINVAL, EPERM, ENOSPC, EIO = errno.EINVAL, errno.EPERM, errno.ENOSPC, errno.EIO


@dataclass
class Chunk:
    """One reply: a simple reply (type -1) or a structured/extended chunk."""

    flags: int
    type: int
    cookie: int
    offset: int  # the header's offset field (extended replies only)
    payload: bytes
    error: int = 0

    @property
    def done(self) -> bool:
        return bool(self.flags & 1)

    @property
    def chunk_error(self) -> int:
        """The errno of an error chunk."""
        return struct.unpack_from(">I", self.payload)[0] if self.type == TYPE_ERROR else 0


class RawClient:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.extended = False
        self.size = 0
        self.flags = 0

    @classmethod
    def connect(cls, path: str, timeout: float = 20.0) -> RawClient:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        return cls(sock)

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    # ---- bytes
    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            got = self.sock.recv(n - len(buf))
            if not got:
                raise ConnectionError(f"server closed after {len(buf)} of {n} bytes")
            buf += got
        return bytes(buf)

    def is_closed(self) -> bool:
        """True if the server closed the connection (EOF or reset)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # ---- handshake
    def greet(self, client_flags: int = 3) -> int:
        magic, opt, hflags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt) == (NBDMAGIC, IHAVEOPT)
        self.sock.sendall(struct.pack(">I", client_flags))
        return hflags

    def send_option(self, option: int, data: bytes = b"", magic: int = IHAVEOPT) -> None:
        self.sock.sendall(struct.pack(">QII", magic, option, len(data)) + data)

    def read_option_reply(self) -> tuple[int, int, bytes]:
        magic, option, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == OPT_REPLY_MAGIC, hex(magic)
        return option, rtype, self.recv_exact(length)

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option, collect (reply type, payload) up to the final reply."""
        self.send_option(option, data)
        replies = []
        while True:
            got, rtype, payload = self.read_option_reply()
            assert got == option
            replies.append((rtype, payload))
            if rtype == REP_ACK or rtype & 2**31:
                return replies

    def set_meta_context(self, name: str = "", queries: tuple[str, ...] = ("base:allocation",)) -> None:
        data = _string(name) + struct.pack(">I", len(queries)) + b"".join(_string(q) for q in queries)
        replies = self.option(OPT_SET_META, data)
        assert replies[-1][0] == REP_ACK, replies

    def go(self, name: str = "") -> list[tuple[int, bytes]]:
        replies = self.option(OPT_GO, _string(name) + struct.pack(">H", 0))
        for rtype, payload in replies:
            if rtype == REP_INFO and struct.unpack_from(">H", payload)[0] == 0:
                _, self.size, self.flags = struct.unpack(">HQH", payload)
        return replies

    def handshake(self, structured: bool = False, extended: bool = False,
                  meta: bool = False, name: str = "") -> None:
        self.greet()
        if extended:
            assert self.option(OPT_EXTENDED_HEADERS)[-1][0] == REP_ACK
            self.extended = True
        elif structured:
            assert self.option(OPT_STRUCTURED_REPLY)[-1][0] == REP_ACK
        if meta:
            self.set_meta_context()
        replies = self.go(name)
        assert replies[-1][0] == REP_ACK, replies

    # ---- transmission
    def send_request(self, cmd: int, offset: int, length: int, flags: int = 0,
                     cookie: int = 1, payload: bytes = b"", magic: int | None = None) -> None:
        if self.extended:
            header = struct.pack(">IHHQQQ", magic or EXT_REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        else:
            header = struct.pack(">IHHQQI", magic or REQUEST_MAGIC, flags, cmd, cookie, offset, length)
        self.sock.sendall(header + payload)

    def read_reply(self, read_length: int = 0) -> Chunk:
        """One reply message; ``read_length`` is the data a simple read reply carries."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == SIMPLE_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            data = self.recv_exact(read_length) if read_length and not error else b""
            return Chunk(1, -1, cookie, 0, data, error)
        if magic == STRUCTURED_MAGIC:
            flags, rtype, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
            return Chunk(flags, rtype, cookie, 0, self.recv_exact(length))
        assert magic == EXT_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        flags, rtype, cookie, offset, length = struct.unpack(">HHQQQ", self.recv_exact(28))
        return Chunk(flags, rtype, cookie, offset, self.recv_exact(length))

    def read_chunks(self) -> list[Chunk]:
        """All chunks of one structured reply, up to the DONE one."""
        chunks = [self.read_reply()]
        while not chunks[-1].done:
            chunks.append(self.read_reply())
        return chunks

    def request_error(self, cmd: int, offset: int, length: int, flags: int = 0,
                      payload: bytes = b"") -> int:
        """Send one request and return its errno (0 on success)."""
        self.send_request(cmd, offset, length, flags, payload=payload)
        reply = self.read_reply(length if cmd == CMD_READ else 0)
        if reply.type == -1:
            return reply.error
        chunks = [reply] if reply.done else [reply, *self.read_chunks()]
        return next((c.chunk_error for c in chunks if c.type == TYPE_ERROR), 0)

    def pwrite(self, data: bytes, offset: int) -> None:
        flags = F_PAYLOAD_LEN if self.extended else 0
        assert self.request_error(CMD_WRITE, offset, len(data), flags, data) == 0

    def pread(self, offset: int, length: int) -> bytes:
        """Read with simple replies, or assemble structured data/hole chunks."""
        self.send_request(CMD_READ, offset, length)
        first = self.read_reply(length)
        if first.type == -1:
            assert first.error == 0, os.strerror(first.error)
            return first.payload
        buf = bytearray(length)
        for chunk in [first] if first.done else [first, *self.read_chunks()]:
            assert chunk.type != TYPE_ERROR, chunk
            (start,) = struct.unpack_from(">Q", chunk.payload)
            if chunk.type == TYPE_OFFSET_DATA:
                buf[start - offset:start - offset + len(chunk.payload) - 8] = chunk.payload[8:]
        return bytes(buf)

    def disconnect(self) -> None:
        self.send_request(CMD_DISC, 0, 0)


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">I", len(raw)) + raw

