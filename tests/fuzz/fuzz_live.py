"""Fuzz targets over real sockets: a live pynbd server, and pynbd's tools
against a malicious server.

``LiveServerTarget(stack)`` serves a real stack in this process (``memory``;
``memory`` under ``--filter=cow``; ``file``) on a private Unix socket and
plays each input to it as one client: the bytes are sent, the write side is
shut, and the replies are read until the server hangs up. A hang (no end
within the bound), a traceback the server logs (``unexpected error``, a layer
raising something other than OSError), a server that stops serving a
well-behaved client, or one that holds ever more file descriptors once its
clients are gone is a finding.

``ToolTarget(tool)`` runs ``pynbd info`` or ``pynbd copy`` (in this process,
their ``main``) against a fake server that replays, mutated, what a real
pynbd server said to that very tool: the conversation is recorded once
through a relay, and an input is the list of server messages, each with how
many client bytes preceded it. The tool must end with a status (0 or 1, one
line on stderr), never an exception, never a hang, and ``copy`` must not
write outside its target (the destination file keeps its size).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import selectors
import socket
import struct
import tempfile
import threading
from collections.abc import Hashable, Sequence

from fuzz_cores import HandshakeTarget
from fuzz_engine import Finding, Hang, open_fds

import pynbd
from pynbd.client import NBD
from pynbd.proto.constants import REPLY_MAGIC, Opt, Rep
from pynbd.tools import copy as copy_tool
from pynbd.tools import info as info_tool

DISK = 1 << 20
RECV_TIMEOUT = 1.0
MAX_FD_GROWTH = 64  # descriptors a stack may keep open for good (an overlay, a cache...)


class ErrorLog(logging.Handler):
    """Collects what the server logs at ERROR (tracebacks of unexpected failures)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))

    def take(self) -> list[str]:
        records, self.records = self.records, []
        return records


STACKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "memory": ("memory", ()),
    "cow": ("memory", ("cow",)),
    "file": ("file", ()),
}


class LiveServerTarget:
    """A real stack served in this process, fed one client byte stream per input."""

    health_every = 250

    def __init__(self, stack: str, timeout: float = RECV_TIMEOUT) -> None:
        self.name = f"live-{stack}"
        self.timeout = timeout
        plugin, filters = STACKS[stack]
        self._tmp = tempfile.TemporaryDirectory(prefix="fuzz")
        args = [f"{DISK}"]
        if plugin == "file":
            path = os.path.join(self._tmp.name, "disk.img")
            with open(path, "wb") as f:
                f.truncate(DISK)
            args = [path]
        self.errors = ErrorLog()
        logging.getLogger("pynbd").addHandler(self.errors)
        self._served = pynbd.serve(plugin, *args, filters=filters)
        self._served.__enter__()
        self._count = 0
        self._fds = open_fds()  # with the server listening, before any client
        self._generator = HandshakeTarget()

    def generate(self, rng: random.Random) -> bytes:
        return self._generator.generate(rng)[1:]  # no configuration byte: the server is tls=off

    def run(self, data: bytes) -> Hashable:
        received = play(self._served.socket, data, self.timeout)
        errors = self.errors.take()
        if errors:
            raise Finding(f"the server logged an error: {errors[0]}")
        self._count += 1
        if self._count % self.health_every == 0:
            self.health_check()
        return (min(received, 1 << 16) >> 4, received > 0)

    def health_check(self) -> None:
        """A well-behaved client still reads back what it wrote, and what earlier clients
        made the server open is bounded (clients gone, their descriptors closed)."""
        with NBD() as h:
            h.connect_uri(self._served.uri)
            h.pwrite(b"health" * 100, 4096)
            if h.pread(600, 4096) != b"health" * 100:
                raise Finding("the server no longer returns what was written")
        fds = open_fds()
        if fds > self._fds + MAX_FD_GROWTH:
            raise Finding(f"the server holds {fds - self._fds} more file descriptors after "
                          f"{self._count} clients have come and gone")

    def close(self) -> None:
        self._served.close()
        logging.getLogger("pynbd").removeHandler(self.errors)
        self._tmp.cleanup()


def play(path: str, data: bytes, timeout: float = RECV_TIMEOUT) -> int:
    """Send ``data`` as a client, shut writing, read to the end; bytes received."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        total = 0
        while True:
            try:
                chunk = sock.recv(1 << 16)
            except ConnectionResetError:
                return total
            except TimeoutError:
                raise Hang(f"the server sent no end in {timeout:g} s") from None
            if not chunk:
                return total
            total += len(chunk)


# ------------------------------------------------------------ malicious server

SEGMENT = struct.Struct(">II")  # client bytes before this message, its length
IDLE = 0.05  # a client that sends nothing for this long is not going to


def encode(messages: Sequence[tuple[int, bytes]]) -> bytes:
    return b"".join(SEGMENT.pack(before, len(m)) + m for before, m in messages)


def decode(data: bytes) -> list[tuple[int, bytes]]:
    """Leniently: a mutated length just takes what is left."""
    messages, pos = [], 0
    while len(data) - pos >= SEGMENT.size:
        before, length = SEGMENT.unpack_from(data, pos)
        pos += SEGMENT.size
        messages.append((before, data[pos:pos + length]))
        pos += length
    return messages


class Relay:
    """Records what a server says to one client, and when (after how many client bytes)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self._dir = tempfile.TemporaryDirectory(prefix="fuzzrelay")
        self.path = os.path.join(self._dir.name, "sock")
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.conversations: list[list[tuple[int, bytes]]] = []
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            messages: list[tuple[int, bytes]] = []
            self.conversations.append(messages)
            thread = threading.Thread(target=self._relay, args=(client, messages), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _relay(self, client: socket.socket, messages: list[tuple[int, bytes]]) -> None:
        with client, socket.socket(socket.AF_UNIX) as server:
            server.connect(self.upstream)
            sent = 0
            with selectors.DefaultSelector() as sel:
                sel.register(client, selectors.EVENT_READ)
                sel.register(server, selectors.EVENT_READ)
                while True:
                    for key, _ in sel.select():
                        data = key.fileobj.recv(1 << 20)  # type: ignore[union-attr]
                        if not data:
                            return
                        if key.fileobj is client:
                            sent += len(data)
                            server.sendall(data)
                        else:
                            messages.append((sent, data))
                            client.sendall(data)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        self.listener.close()
        self._accepter.join()
        for thread in self._threads:
            thread.join()
        self._dir.cleanup()


class FakeServer:
    """Replays one conversation per connection, each message once the client has
    sent what preceded it (or has gone quiet)."""

    def __init__(self) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="fuzzfake")
        self.path = os.path.join(self._dir.name, "sock")
        self.uri = f"nbd+unix:///?socket={self.path}"
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(16)
        self.script: list[tuple[int, bytes]] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._threads: list[threading.Thread] = []
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._replay, args=(client, list(self.script)),
                                      daemon=True)
            self._threads.append(thread)
            thread.start()

    def _replay(self, client: socket.socket, script: list[tuple[int, bytes]]) -> None:
        with client:
            got = 0
            try:
                for before, message in script:
                    got = _wait_for_bytes(client, got, before)
                    if got < 0:
                        return
                    client.sendall(message)
                client.shutdown(socket.SHUT_WR)
                _wait_for_bytes(client, got, 1 << 62)
            except OSError:
                return

    def finish(self) -> None:
        """Wait for the connections of the last input to end."""
        threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(5)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._accepter.join()
        self.finish()
        self._dir.cleanup()


def _wait_for_bytes(sock: socket.socket, got: int, want: int) -> int:
    """Read until ``want`` bytes in all, an idle pause, or the end (-1)."""
    sock.settimeout(IDLE)
    while got < want:
        try:
            data = sock.recv(1 << 20)
        except TimeoutError:
            return got
        if not data:
            return -1
        got += len(data)
    return got


INFO_EXPORT_REPLY = struct.pack(">QII", REPLY_MAGIC, Opt.GO, Rep.INFO)  # then length, type, size


def advertised_sizes(data: bytes) -> set[int]:
    """Every export size the server's messages may have given: in an NBD_INFO_EXPORT
    reply, or as the first 8 bytes of a message (the NBD_OPT_EXPORT_NAME reply of a
    server that is not fixed newstyle)."""
    messages = decode(data)
    stream = b"".join(message for _, message in messages)
    sizes = {struct.unpack_from(">Q", m)[0] for _, m in messages if len(m) >= 8}
    pos = stream.find(INFO_EXPORT_REPLY[:8])
    while pos >= 0:
        reply = stream[pos + 8:pos + 30]
        if len(reply) == 22:
            _, rtype, _, info, size = struct.unpack(">IIIHQ", reply)
            if rtype == Rep.INFO and info == 0:
                sizes.add(size)
        pos = stream.find(INFO_EXPORT_REPLY[:8], pos + 1)
    return sizes


TOOLS = {
    "info": lambda uri, dst: info_tool.main([uri]),
    "info-map": lambda uri, dst: info_tool.main(["--map", "--json", uri]),
    "copy": lambda uri, dst: copy_tool.main(["-C", "1", "--request-size=65536", uri, dst]),
}


class ToolTarget:
    """``pynbd info`` / ``pynbd copy`` against a malicious replay of a real server."""

    def __init__(self, tool: str) -> None:
        self.name = f"client-{tool}"
        self.tool = TOOLS[tool]
        self._tmp = tempfile.TemporaryDirectory(prefix="fuzztool")
        self.dst = os.path.join(self._tmp.name, "dst.img")
        self._reset_dst()
        with pynbd.serve("memory", f"{DISK}") as served:
            with NBD() as h:
                h.connect_uri(served.uri)
                for offset in range(0, DISK, 256 * 1024):
                    h.pwrite(b"data" * 1024, offset)
            relay = Relay(served.socket)
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    status = self.tool(f"nbd+unix:///?socket={relay.path}", self.dst)
            finally:
                relay.close()
        if status != 0 or not relay.conversations:
            raise RuntimeError(f"{self.name}: recording the real conversation failed ({status})")
        self.recorded = encode(relay.conversations[0])
        self.fake = FakeServer()

    def _reset_dst(self) -> None:
        with open(self.dst, "wb") as f:
            f.truncate(DISK)

    def generate(self, rng: random.Random) -> bytes:
        """The recorded conversation, sometimes with another export size in it."""
        if rng.random() < 0.7:
            return self.recorded
        return self.with_size(rng.choice((0, 1, 511, 512, DISK - 1, DISK + 512, 2 * DISK, 1 << 40,
                                          (1 << 63) - 1, 1 << 63, (1 << 64) - 1)))

    def with_size(self, size: int) -> bytes:
        """The recorded conversation with the export's size replaced by ``size``."""
        return self.recorded.replace(INFO_EXPORT_REPLY + struct.pack(">IHQ", 12, 0, DISK),
                                     INFO_EXPORT_REPLY + struct.pack(">IHQ", 12, 0, size))

    def run(self, data: bytes) -> Hashable:
        self.fake.script = decode(data)
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = self.tool(self.fake.uri, self.dst)
        finally:
            self.fake.finish()
        size = os.stat(self.dst).st_size
        if size != DISK:  # copy sizes a file to the source, as nbdcopy does: to nothing else
            self._reset_dst()  # (it empties the file first: a size it cannot set leaves it empty)
            if size not in advertised_sizes(data) and not (size == 0 and status == 1):
                raise Finding(f"copy made its destination {size} bytes, a size the source "
                              f"never advertised")
        lines = err.getvalue().strip().splitlines()
        if status not in (0, 1) or (status == 1 and len(lines) != 1):
            raise Finding(f"exit status {status} with stderr {err.getvalue()[:300]!r}")
        # the message without the tool's name and the (random) socket path of the source
        words = lines[0].replace(self.fake.uri, "URI").split(": ", 1)[-1] if lines else ""
        return (status, "".join(c for c in words if not c.isdigit())[:60])

    def close(self) -> None:
        self.fake.close()
        self._tmp.cleanup()

