"""Fuzz targets for the sans-IO cores: the server handshake, the server's
transmission core and the client's reply parser.

Each target's input is bytes; its first bytes choose a configuration (TLS
mode, negotiated terms, structured/extended replies) so that mutations move
through configurations too. The generators build valid-ish streams: real
option sequences, request headers near the export's edges, reply chunks
that cover (or miss) the requested ranges.

Invariants checked besides "no exception but the documented protocol errors":

- handshake: every byte it sends parses as option replies; it never asks for
  more than one option header or payload at a time (memory bounded); with
  ``tls=require`` no export fact (INFO, SERVER, META_CONTEXT replies) and no
  transmission phase before STARTTLS;
- transmission: a request ``check`` accepts is inside the export, keeps the
  negotiated flags, alignment and maximum, and is not a write to a read-only
  export; every read reply the server builds, fed to the client parser,
  completes the read with exactly the data (zeroes for holes);
- client: a malicious reply stream never writes outside the caller's read
  buffer (canaries on both sides), a read reported successful was covered
  in full, and only ``RemoteProtocolError`` is raised.
"""

from __future__ import annotations

import errno
import random
import struct
from collections.abc import Hashable

from fuzz_engine import Finding

from pynbd.proto import wire
from pynbd.proto.client_handshake import ClientHandshake, HandshakeConfig, OptionRefused
from pynbd.proto.client_handshake import Ready as ClientReady
from pynbd.proto.client_transmission import Transmission
from pynbd.proto.constants import (
    MAX_OPTION_LENGTH,
    OPTION_HEADER_SIZE,
    REPLY_MAGIC,
    Cmd,
    CmdFlag,
    Opt,
    Rep,
)
from pynbd.proto.constants import TransmissionFlag as TF
from pynbd.proto.errors import RemoteProtocolError
from pynbd.proto.machine import NeedData, Send
from pynbd.proto.server_handshake import (
    Closed,
    ExportInfo,
    ListExports,
    ListMetaContexts,
    OpenExport,
    Ready,
    ServerHandshake,
    StartTLS,
)
from pynbd.proto.server_transmission import COMMAND_FLAGS, Refusal, ServerTransmission, Terms

READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZERO, BLOCK_STATUS = range(8)
PAYLOAD_LEN = int(CmdFlag.PAYLOAD_LEN)
EXPORTS = {"": 1 << 20, "second": 4096, "odd": 1000}  # name → size ("bad" fails to open)
CONTEXTS = ["qemu:dirty-bitmap:b0", "qemu:allocation-depth"]
QUERIES = ["base:allocation", "qemu:", "qemu:dirty-bitmap:", "qemu:dirty-bitmap:b0", "x", "",
           "base:", "qemu:allocation-depth"]
EXPORT_FACTS = {int(Rep.INFO), int(Rep.SERVER), int(Rep.META_CONTEXT)}
ZERO_BUFFER = bytes(1 << 16)
DATA_BUFFER = bytes(range(256)) * 256
CANARY = b"\xa5" * 64
MAX_REQUESTS = 64  # per input, so that an input stays well under a millisecond or two


def _names(rng: random.Random) -> str:
    return rng.choice(["", "", "second", "odd", "bad", "nosuch", "x" * rng.choice((1, 300, 5000))])


def random_option(rng: random.Random) -> tuple[int, bytes]:
    """A plausible option (number, payload)."""
    opt = rng.choice([1, 2, 3, 5, 6, 7, 7, 7, 8, 8, 9, 10, 10, 11, 11, 4, 12, rng.randrange(1 << 32)])
    if opt == Opt.EXPORT_NAME:
        data = _names(rng).encode()
    elif opt in (Opt.INFO, Opt.GO):
        infos = [rng.choice((0, 1, 2, 3, 4, 99)) for _ in range(rng.randrange(4))]
        data = wire.info_request(_names(rng), infos)
    elif opt in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
        queries = [rng.choice(QUERIES) for _ in range(rng.randrange(4))]
        data = wire.meta_context_request(_names(rng), queries)
    else:
        data = b"" if rng.random() < 0.8 else rng.randbytes(rng.randrange(1, 16))
    return opt, data


def random_request(rng: random.Random, size: int, extended: bool) -> bytes:
    """A request header (and its payload) near the interesting edges of an export."""
    cmd = rng.choice([0, 0, 1, 1, 2, 3, 4, 5, 6, 7, 7, 8, rng.randrange(1 << 16)])
    flags = rng.choice([0, 0, 1, 2, 4, 8, 16, 32, rng.randrange(1 << 16)])
    length = rng.choice([0, 1, 511, 512, 4096, 65536, 1 << 25, (1 << 25) + 1, 0xFFFFFFFF,
                         rng.randrange(1 << 17)])
    offset = rng.choice([0, 0, 512, max(0, size - length), size, size - 1, 1 << 63,
                         (1 << 64) - 1, rng.randrange(max(size, 1))]) & ((1 << 64) - 1)
    if not extended:
        length &= 0xFFFFFFFF
    header = wire.request(flags, cmd, rng.randrange(1 << 64), max(offset, 0), length, extended)
    payload = 0
    if cmd == WRITE and not extended:
        payload = length
    elif extended and flags & PAYLOAD_LEN:
        payload = length
    if payload > 4096:  # keep inputs small: a truncated payload ends the stream early
        payload = rng.randrange(64)
    if cmd == BLOCK_STATUS and extended and flags & PAYLOAD_LEN:
        body = struct.pack(">Q", length) + b"".join(struct.pack(">I", rng.choice((0, 1, 2, 3)))
                                                    for _ in range(rng.randrange(3)))
        return wire.request(flags, cmd, 7, offset, len(body), extended) + body
    return header + rng.randbytes(payload)


# ---------------------------------------------------------------- handshake

def _check_option_replies(data: bytes, before_tls: bool) -> list[int]:
    """The reply types in ``data`` (option replies only); Finding if malformed."""
    types = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < wire.OPTION_REPLY_HEADER.size:
            raise Finding(f"truncated option reply {data[pos:]!r}")
        magic, _, rtype, length = wire.OPTION_REPLY_HEADER.unpack_from(data, pos)
        if magic != REPLY_MAGIC:
            raise Finding(f"option reply with magic {magic:#x}")
        pos += wire.OPTION_REPLY_HEADER.size + length
        if pos > len(data):
            raise Finding("option reply longer than what was sent")
        if before_tls and rtype in EXPORT_FACTS:
            raise Finding(f"reply type {rtype} sent before TLS with tls=require")
        types.append(rtype)
    return types


def answer(hs: ServerHandshake, event: object) -> ExportInfo | None:
    """Answer a question of the handshake as the server's catalog would."""
    if isinstance(event, ListExports):
        hs.exports_listed([(name, f"export {name}") for name in EXPORTS])
    elif isinstance(event, ListMetaContexts):
        hs.meta_contexts_listed(list(CONTEXTS))
    elif isinstance(event, OpenExport):
        if event.name == "bad":
            hs.export_refused("cannot open export 'bad': Input/output error", unknown=False)
        elif event.name not in EXPORTS:
            hs.export_refused(f"no export {event.name!r}")
        else:
            size = EXPORTS[event.name]
            flags = TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES \
                | TF.SEND_DF | TF.CAN_MULTI_CONN | TF.SEND_CACHE | TF.SEND_FAST_ZERO
            if event.name == "second":
                flags |= TF.READ_ONLY
            info = ExportInfo(event.name, size, int(flags), (512 if size % 512 == 0 else 1, 4096, 1 << 25))
            hs.export_opened(info)
            return info
    return None


def drive_handshake(data: bytes) -> Hashable:
    """Run one client byte stream through ServerHandshake, then the transmission core."""
    config = data[0] if data else 0
    tls = ("off", "on", "require")[config % 3]
    hs = ServerHandshake(tls=tls, forced_export="second" if config & 4 else None)
    hs.greeting()
    pos, signature = 1, []
    while True:
        event = hs.next_event()
        if answer(hs, event) is not None or isinstance(event, ListExports | ListMetaContexts | OpenExport):
            signature.append(type(event).__name__[:4])
            continue
        before_tls = tls == "require" and not hs.tls_active
        if isinstance(event, NeedData):
            if event.size > max(MAX_OPTION_LENGTH, OPTION_HEADER_SIZE):
                raise Finding(f"the handshake asks for {event.size} bytes at once")
            if pos >= len(data):
                return tuple(signature)
            hs.receive_data(data[pos:pos + event.size])
            pos += event.size
        elif isinstance(event, Send):
            signature.extend(_check_option_replies(event.data, before_tls)[:4])
        elif isinstance(event, StartTLS):
            _check_option_replies(event.data, before_tls)
            signature.append("TLS")
            hs.tls_established()
        elif isinstance(event, Closed):
            signature.append("C")
            return tuple(signature)
        elif isinstance(event, Ready):
            if before_tls:
                raise Finding("transmission reached before TLS with tls=require")
            if event.export.flags & TF.HAS_FLAGS == 0:
                raise Finding("export flags without HAS_FLAGS")
            terms = Terms(event.export.size, event.export.flags, event.export.block_size,
                          event.structured_replies, event.extended_headers, event.meta_contexts)
            signature.append(("R", event.structured_replies, event.extended_headers,
                              len(event.meta_contexts)))
            signature.extend(drive_requests(ServerTransmission(terms), data, pos))
            return tuple(signature)
        else:
            raise Finding(f"unexpected event {event!r}")


# ------------------------------------------------------------- transmission

def check_oracle(tx: ServerTransmission, flags: int, cmd: int, offset: int, length: int) -> None:
    """What an accepted request must satisfy (Finding if ``check`` accepted worse)."""
    terms = tx.terms
    if cmd not in COMMAND_FLAGS:
        raise Finding(f"unknown command {cmd} accepted")
    allowed = COMMAND_FLAGS[cmd] | (PAYLOAD_LEN if cmd == BLOCK_STATUS and tx.extended else 0)
    if flags & ~allowed:
        raise Finding(f"flags {flags:#x} accepted on command {cmd}")
    if cmd in (FLUSH, DISC):
        return
    if offset + length > terms.size:
        raise Finding(f"command {cmd} at {offset}+{length} accepted past the end ({terms.size})")
    if cmd in (WRITE, TRIM, ZERO) and terms.flags & TF.READ_ONLY:
        raise Finding(f"command {cmd} accepted on a read-only export")
    if cmd in (READ, WRITE) and length > terms.block_size[2]:
        raise Finding(f"command {cmd} of {length} bytes accepted over the maximum")
    minimum = terms.block_size[0]
    if minimum > 1 and (offset % minimum or length % minimum):
        raise Finding(f"unaligned command {cmd} at {offset}+{length} accepted")
    if cmd == BLOCK_STATUS and not terms.contexts:
        raise Finding("block status accepted without a meta context")


def read_round_trip(tx: ServerTransmission, offset: int, length: int, pattern: int) -> None:
    """The reply the server builds for a read, parsed by the client, gives the data back."""
    length = min(length, len(ZERO_BUFFER))
    pieces, pos = [], 0
    while pos < length:  # alternate data and holes by ``pattern``'s bits
        size = min(length - pos, 1 + (pattern * 37 + pos) % 9000)
        hole = (pattern >> (len(pieces) % 8)) & 1
        pieces.append(memoryview(ZERO_BUFFER)[:size] if hole else memoryview(DATA_BUFFER)[pos:pos + size])
        pos += size
    expected = b"".join(bytes(p) for p in pieces)
    client = Transmission(tx.structured, tx.extended, tx.terms.contexts, buffer_size=8192)
    buf = bytearray(CANARY + bytes(length) + CANARY)
    command, _ = client.request(Cmd.READ, offset, length, buf=memoryview(buf)[64:64 + length])
    parts = tx.read_chunks(command.cookie, offset, pieces, ZERO_BUFFER)
    stream = b"".join(bytes(p) for p in parts)
    for start in range(0, len(stream), 5000):
        chunk = stream[start:start + 5000]
        target = client.get_buffer()
        target[:len(chunk)] = chunk
        client.buffer_updated(len(chunk))
    if not command.done or command.error or bytes(buf[64:64 + length]) != expected:
        raise Finding(f"read of {length} at {offset} did not round-trip "
                      f"(done={command.done}, error={command.error})")
    if buf[:64] != CANARY or buf[64 + length:] != CANARY:
        raise Finding("read reply wrote outside the read buffer")


def drive_requests(tx: ServerTransmission, data: bytes, pos: int, round_trip: bool = False) -> list[Hashable]:
    """Parse, check and answer the requests in ``data[pos:]``; their outcome signature."""
    signature: list[Hashable] = []
    for _ in range(MAX_REQUESTS):
        if len(data) - pos < tx.header_size:
            break
        try:
            flags, cmd, cookie, offset, length, payload = tx.parse_request(data, pos)
        except RemoteProtocolError:
            signature.append("bad")
            break
        pos += tx.header_size
        body = data[pos:pos + payload]
        pos += payload
        refusal = tx.check(flags, cmd, offset, length)
        signature.append((min(cmd, 8), refusal.message.split(" ")[0][:12] if refusal else "ok"))
        if refusal is not None:
            tx.error(cookie, cmd, refusal.errno, refusal.message, offset)
            continue
        check_oracle(tx, flags, cmd, offset, length)
        if cmd == READ:
            if round_trip:
                read_round_trip(tx, offset, length, cookie & 0xFFFF)
            else:
                tx.read_header(cookie, offset, length)
        elif cmd == BLOCK_STATUS:
            ids = list(tx.terms.contexts)
            if flags & PAYLOAD_LEN:
                selection = tx.block_status_selection(body)
                if isinstance(selection, Refusal):
                    signature.append("sel-refused")
                    continue
                if not set(selection[1]) <= set(tx.terms.contexts):
                    raise Finding(f"block status selection {selection} names unknown contexts")
                ids = selection[1]
            tx.block_status(cookie, offset, [(i, [(max(length, 1), 0)]) for i in ids])
        else:
            tx.ok(cookie, offset)
    return signature


SIZES = [0, 1, 512, 1000, 4096, 1 << 20, (1 << 20) + 1, 1 << 40, (1 << 63) - 1]
MINIMUMS = [1, 1, 512, 4096, 3]
MAXIMUMS = [1 << 25, 65536, 4096, 512, 0xFFFFFFFF]
TERMS = struct.Struct(">BHBBB")  # size index, flags, minimum index, maximum index, mode


def terms_from(data: bytes) -> Terms:
    size_i, flags, min_i, max_i, mode = TERMS.unpack_from(data.ljust(TERMS.size, b"\0"))
    extended = bool(mode & 2)
    contexts = {i + 1: name for i, name in enumerate(["base:allocation", *CONTEXTS][:mode >> 2 & 3])}
    return Terms(SIZES[size_i % len(SIZES)], flags | TF.HAS_FLAGS,
                 (MINIMUMS[min_i % len(MINIMUMS)], 4096, MAXIMUMS[max_i % len(MAXIMUMS)]),
                 structured=bool(mode & 1) or extended, extended=extended, contexts=contexts)


# ------------------------------------------------------------------- targets

class HandshakeTarget:
    """ServerHandshake (then ServerTransmission) fed one client byte stream."""

    name = "server-handshake"

    def generate(self, rng: random.Random) -> bytes:
        out = [bytes([rng.randrange(8)]), struct.pack(">I", rng.choice((3, 3, 3, 1, 0, 2, 7)))]
        extended = False
        for _ in range(rng.randrange(6)):
            opt, data = random_option(rng)
            extended = extended or opt == Opt.EXTENDED_HEADERS
            out.append(wire.option_request(opt, data))
        if rng.random() < 0.8:
            final = rng.choice((Opt.GO, Opt.GO, Opt.EXPORT_NAME))
            name = rng.choice(["", "", "second", "odd", "nosuch"])
            data = name.encode() if final == Opt.EXPORT_NAME else wire.info_request(name, [])
            out.append(wire.option_request(final, data))
            size = EXPORTS.get(name, 1 << 20)
            out.extend(random_request(rng, size, extended) for _ in range(rng.randrange(8)))
        return b"".join(out)

    def run(self, data: bytes) -> Hashable:
        return drive_handshake(data)

    def close(self) -> None:
        return None


class TransmissionTarget:
    """ServerTransmission: parse, check and answer request streams under random terms."""

    name = "server-transmission"

    def generate(self, rng: random.Random) -> bytes:
        head = TERMS.pack(rng.randrange(len(SIZES)), rng.randrange(1 << 16), rng.randrange(5),
                          rng.randrange(5), rng.randrange(16))
        terms = terms_from(head)
        return head + b"".join(random_request(rng, terms.size, terms.extended)
                               for _ in range(rng.randrange(1, 12)))

    def run(self, data: bytes) -> Hashable:
        tx = ServerTransmission(terms_from(data))
        return tuple(drive_requests(tx, data, TERMS.size, round_trip=True))

    def close(self) -> None:
        return None


REQUEST_SPEC = struct.Struct(">BHH")  # command selector, count in 512-byte units (+1), offset


class ClientTarget:
    """The client's reply parser fed a (malicious) server's reply stream."""

    name = "client-transmission"
    commands = (Cmd.READ, Cmd.READ, Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.BLOCK_STATUS, Cmd.TRIM)

    def generate(self, rng: random.Random) -> bytes:
        mode = rng.randrange(8)
        structured, extended = bool(mode & 1) or bool(mode & 2), bool(mode & 2)
        specs = [(rng.randrange(len(self.commands)), rng.choice((0, 1, 7, 127)), rng.randrange(1 << 16))
                 for _ in range(rng.randrange(1, 5))]
        out = [bytes([mode, len(specs)]), *(REQUEST_SPEC.pack(*s) for s in specs)]
        cookies = list(enumerate(specs, 1))
        rng.shuffle(cookies)
        for cookie, (selector, units, offset) in cookies:
            cmd, count, offset = self.commands[selector], (units + 1) * 512, offset * 512
            out.append(self._reply(rng, cookie, cmd, offset, count, structured, extended))
        return b"".join(out)

    def _reply(self, rng: random.Random, cookie: int, cmd: int, offset: int, count: int,
               structured: bool, extended: bool) -> bytes:
        if not structured or (cmd != Cmd.READ and cmd != Cmd.BLOCK_STATUS):
            if structured and rng.random() < 0.5:
                return wire.done_chunk(cookie, extended, offset)
            reply = wire.simple_reply(cookie, rng.choice((0, 0, 0, errno.EIO)))
            return reply + (rng.randbytes(count) if cmd == Cmd.READ and not structured else b"")
        if rng.random() < 0.15:
            return wire.error_chunk(cookie, errno.EIO, "fuzz", extended, offset)
        if cmd == Cmd.BLOCK_STATUS:
            return wire.block_status_chunk(cookie, 1, [(count // 2, 0), (count - count // 2, 3)],
                                           True, extended, offset)
        chunks, pos = [], offset
        while pos < offset + count:
            size = min(offset + count - pos, rng.choice((512, 1024, count)))
            done = pos + size >= offset + count and rng.random() < 0.7
            if rng.random() < 0.4:
                chunks.append(wire.hole_chunk(cookie, pos, size, done, extended, offset))
            else:
                chunks.append(wire.read_data_header(cookie, pos, size, done, extended, offset)
                              + rng.randbytes(size))
            pos += size
        if chunks and rng.random() < 0.3:
            rng.shuffle(chunks)
        if not any(c[6:8] == b"\x00\x01" for c in chunks) or rng.random() < 0.3:
            chunks.append(wire.done_chunk(cookie, extended, offset))
        return b"".join(chunks)

    def run(self, data: bytes) -> Hashable:
        if len(data) < 2:
            return "short"
        mode, count = data[0], data[1] % 8
        extended = bool(mode & 2)
        client = Transmission(bool(mode & 1), extended, {1: "base:allocation"}, buffer_size=4096)
        client.direct_reads = bool(mode & 4)  # as a driver receiving large reads in place
        pos = 2
        reads: list[tuple[bytearray, int]] = []
        commands = []
        for _ in range(count):
            if len(data) - pos < REQUEST_SPEC.size:
                return "short"
            selector, units, offset = REQUEST_SPEC.unpack_from(data, pos)
            pos += REQUEST_SPEC.size
            cmd = self.commands[selector % len(self.commands)]
            length = (units % 256 + 1) * 512
            buf = None
            if cmd == Cmd.READ:
                area = bytearray(CANARY + bytes(length) + CANARY)
                reads.append((area, length))
                buf = memoryview(area)[64:64 + length]
            command, _ = client.request(cmd, offset * 512, length, buf=buf)
            commands.append(command)
        finished = 0
        outcome = "ok"
        try:
            step = max(1 + data[-1] % 4096, (len(data) - pos) // 64)
            while pos < len(data):
                target = client.get_buffer()
                n = min(len(target), step, len(data) - pos)
                target[:n] = data[pos:pos + n]
                pos += n
                finished += len(client.buffer_updated(n))
        except RemoteProtocolError as exc:
            outcome = str(exc).split(" ")[0]
        for area, length in reads:
            if area[:64] != CANARY or area[64 + length:] != CANARY:
                raise Finding("a reply wrote outside the read buffer")
        for command in commands:
            if command.done and command.cmd == Cmd.READ and not command.error \
                    and command.covered != command.count:
                raise Finding(f"read reported done with {command.covered} of {command.count} bytes")
        return (outcome, finished, mode & 7)

    def close(self) -> None:
        return None


def client_config(byte: int) -> HandshakeConfig:
    return HandshakeConfig(export_name=("", "second", "odd", "nosuch")[byte & 3],
                           structured_replies=bool(byte & 4), extended_headers=bool(byte & 8),
                           meta_contexts=["base:allocation", *CONTEXTS][:byte >> 4 & 3],
                           full_info=bool(byte & 64))


class ClientHandshakeTarget:
    """The client's handshake machine fed a (malicious) server's bytes.

    Seeds are real conversations: the client machine talks to the server
    machine in memory, and what the server said is the input to mutate.
    """

    name = "client-handshake"

    def generate(self, rng: random.Random) -> bytes:
        config = rng.randrange(256)
        client = ClientHandshake(client_config(config))
        server = ServerHandshake(tls="off", forced_export="second" if rng.random() < 0.2 else None)
        said = [server.greeting()]
        to_client = said[0]
        for _ in range(200):
            try:
                event = client.next_event()
            except OptionRefused:
                break
            if isinstance(event, NeedData):
                if len(to_client) < event.size:
                    break
                client.receive_data(to_client[:event.size])
                to_client = to_client[event.size:]
            elif isinstance(event, Send):
                server.receive_data(event.data)
                reply = _serve_until_data(server)
                said.append(reply)
                to_client += reply
            else:
                break
        return bytes([config]) + b"".join(said)

    def run(self, data: bytes) -> Hashable:
        if not data:
            return "empty"
        client = ClientHandshake(client_config(data[0]))
        pos = 1
        try:
            for _ in range(10_000):
                event = client.next_event()
                if isinstance(event, NeedData):
                    if pos >= len(data):
                        return ("lost", client.state.name)
                    client.receive_data(data[pos:pos + event.size])
                    pos += event.size
                elif isinstance(event, ClientReady):
                    negotiated = event.negotiated
                    if negotiated.size < 0 or negotiated.size >= 1 << 64:
                        raise Finding(f"export size {negotiated.size}")
                    return ("ready", negotiated.structured_replies, negotiated.extended_headers,
                            len(negotiated.meta_contexts))
                elif not isinstance(event, Send):
                    return type(event).__name__
            raise Finding("the client handshake made 10,000 moves")
        except OptionRefused as exc:
            return ("refused", exc.reply)
        except RemoteProtocolError as exc:
            return ("protocol", str(exc).split(" ")[0], client.state.name)

    def close(self) -> None:
        return None


def _serve_until_data(server: ServerHandshake) -> bytes:
    """Run the server machine until it needs bytes; what it sends."""
    out = []
    while True:
        event = server.next_event()
        if answer(server, event) is not None or isinstance(event, ListExports | ListMetaContexts
                                                           | OpenExport):
            continue
        if isinstance(event, Send):
            out.append(event.data)
        elif isinstance(event, Closed | Ready):
            out.append(event.reply)
            return b"".join(out)
        else:
            return b"".join(out)


CORE_TARGETS = (HandshakeTarget, TransmissionTarget, ClientTarget, ClientHandshakeTarget)
