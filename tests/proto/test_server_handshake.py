"""The server handshake as a pure state machine: byte strings in, events out.

No sockets and no plugin: a fake catalog answers the handshake's questions
(ListExports, OpenExport) as the server's driver would, and every client
message is packed here with ``struct`` from doc/proto.md.
"""

from __future__ import annotations

import struct

import pytest

from pynbd.proto.errors import LocalProtocolError
from pynbd.proto.machine import NeedData
from pynbd.proto.server_handshake import (
    Closed,
    ExportInfo,
    ListExports,
    ListMetaContexts,
    OpenExport,
    Ready,
    ServerHandshake,
    StartTLS,
    State,
)

IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
ACK, SERVER, INFO, META = 1, 2, 3, 4
ERR_UNSUP, ERR_INVALID, ERR_TLS_REQD, ERR_UNKNOWN = 2**31 + 1, 2**31 + 3, 2**31 + 5, 2**31 + 6
ERR_TOO_BIG, ERR_EXT_HEADER_REQD = 2**31 + 9, 2**31 + 10
HAS_FLAGS, READ_ONLY, SEND_DF = 1, 2, 1 << 7


class Catalog:
    """Answers the handshake's questions, as the server's session does."""

    def __init__(self, contexts: tuple[str, ...] = ("qemu:dirty-bitmap:b0", "qemu:allocation-depth")) -> None:
        self.opened: list[tuple[str, bool]] = []  # (name, kept open)
        self.contexts = contexts  # what every export offers besides base:allocation
        self.asked_contexts: list[str] = []  # the export names ListMetaContexts asked about

    def answer(self, hs: ServerHandshake, event) -> bool:
        """Answer ``event`` if it is a question; False if it is not one."""
        if isinstance(event, ListExports):
            hs.exports_listed([("", "the default"), ("second", "")])
        elif isinstance(event, ListMetaContexts):
            self.asked_contexts.append(event.name)
            hs.meta_contexts_listed(list(self.contexts))
        elif isinstance(event, OpenExport):
            if event.name not in ("", "second"):
                hs.export_refused(f"no export {event.name!r}")
                return True
            self.opened.append((event.name, event.keep))
            hs.export_opened(ExportInfo(name=event.name or "default", size=1 << 20,
                                        flags=HAS_FLAGS | READ_ONLY | SEND_DF,
                                        block_size=(1, 4096, 1 << 25), description="a disk"))
        else:
            return False
        return True


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def string(text: str) -> bytes:
    return struct.pack(">I", len(text)) + text.encode()


def go_data(name: str = "", infos: tuple[int, ...] = ()) -> bytes:
    return string(name) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)


def replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split server bytes into (option, reply type, payload)."""
    out = []
    while data:
        magic, opt, rtype, length = struct.unpack_from(">QIII", data)
        assert magic == REPLY_MAGIC
        out.append((opt, rtype, data[20:20 + length]))
        data = data[20 + length:]
    return out


def feed(hs: ServerHandshake, data: bytes, catalog: Catalog | None = None):
    """Feed bytes as the driver would (exactly what is asked), answer the
    questions, and return the next event for the client."""
    catalog = catalog or Catalog()
    while True:
        event = hs.next_event()
        if catalog.answer(hs, event):
            continue
        if not isinstance(event, NeedData):
            return event
        assert data, "the handshake asked for more bytes than the client sent"
        hs.receive_data(data[:event.size])
        data = data[event.size:]


def started(**kw) -> ServerHandshake:
    hs = ServerHandshake(**kw)
    hs.receive_data(struct.pack(">I", 3))
    return hs


def test_greeting_and_byte_exact_reads():
    hs = ServerHandshake()
    assert hs.greeting() == struct.pack(">QQH", 0x4E42444D41474943, IHAVEOPT, 3)
    assert hs.next_event() == NeedData(4)
    hs.receive_data(struct.pack(">I", 3))
    assert hs.next_event() == NeedData(16)
    hs.receive_data(option(7, go_data())[:10])
    assert hs.next_event() == NeedData(6)  # never more than the header needs


def test_unknown_client_flags_close():
    hs = ServerHandshake()
    hs.receive_data(struct.pack(">I", 0x100))
    assert isinstance(hs.next_event(), Closed)


def test_bad_option_magic_closes():
    hs = started()
    event = feed(hs, struct.pack(">QII", 0x1234, 7, 0))
    assert isinstance(event, Closed) and hs.state is State.DONE


def test_unknown_option_is_unsupported_and_skipped():
    hs = started()
    event = feed(hs, option(200, b"abcdef"))
    assert [r[1] for r in replies(event.data)] == [ERR_UNSUP]
    assert isinstance(feed(hs, option(7, go_data())), Ready)


def test_option_over_the_limit():
    hs = started()
    event = feed(hs, struct.pack(">QII", IHAVEOPT, 7, 1 << 30))
    assert isinstance(event, Closed) and replies(event.reply)[0][1] == ERR_TOO_BIG


def test_list():
    event = feed(started(), option(3))
    got = replies(event.data)
    assert [r[1] for r in got] == [SERVER, SERVER, ACK]
    assert got[0][2] == string("") + b"the default" and got[1][2] == string("second")
    assert replies(feed(started(), option(3, b"x")).data)[0][1] == ERR_INVALID


def test_info_opens_and_closes_go_opens_and_keeps():
    catalog = Catalog()
    hs = started()
    event = feed(hs, option(6, go_data("", (1, 2, 3))), catalog)
    got = replies(event.data)
    assert [r[1] for r in got] == [INFO, INFO, INFO, INFO, ACK]
    infos = {struct.unpack_from(">H", p)[0]: p for _, _, p in got[:-1]}
    assert struct.unpack(">HQH", infos[0]) == (0, 1 << 20, HAS_FLAGS | READ_ONLY)  # no DF yet
    assert infos[1][2:] == b"default" and infos[2][2:] == b"a disk"
    assert struct.unpack(">HIII", infos[3]) == (3, 1, 4096, 1 << 25)
    ready = feed(hs, option(7, go_data("")), catalog)
    assert isinstance(ready, Ready) and catalog.opened == [("", False), ("", True)]
    assert not ready.structured_replies and ready.export.flags & SEND_DF == 0


def test_go_unknown_export():
    event = feed(started(), option(7, go_data("nope")))
    assert replies(event.data)[0][1] == ERR_UNKNOWN


def test_go_malformed_payload():
    event = feed(started(), option(7, string("") + b"\x00"))
    assert replies(event.data)[0][1] == ERR_INVALID


def test_forced_export_name():
    hs = started(forced_export="second")
    assert replies(feed(hs, option(7, go_data("other"))).data)[0][1] == ERR_UNKNOWN
    assert feed(hs, option(7, go_data("second"))).export.name == "second"


def test_structured_replies_and_meta_contexts():
    hs = started()
    assert replies(feed(hs, option(10, string("") + struct.pack(">I", 0))).data)[0][1] == ERR_INVALID
    assert replies(feed(hs, option(8)).data)[0][1] == ACK
    assert replies(feed(hs, option(8)).data)[0][1] == ERR_INVALID  # twice
    listed = replies(feed(hs, option(9, string("") + struct.pack(">I", 0))).data)
    assert [r[1] for r in listed] == [META, META, META, ACK] and listed[0][2][4:] == b"base:allocation"
    query = string("") + struct.pack(">I", 2) + string("base:allocation") + string("qemu:nope")
    chosen = replies(feed(hs, option(10, query)).data)
    assert [r[1] for r in chosen] == [META, ACK]
    context_id = struct.unpack_from(">I", chosen[0][2])[0]
    ready = feed(hs, option(7, go_data()))
    assert ready.structured_replies and ready.meta_contexts == {context_id: "base:allocation"}
    assert ready.export.flags & SEND_DF


def test_extended_headers_imply_structured_and_refuse_downgrade():
    hs = started()
    assert replies(feed(hs, option(11)).data)[0][1] == ACK
    assert replies(feed(hs, option(8)).data)[0][1] == ERR_EXT_HEADER_REQD
    ready = feed(hs, option(7, go_data()))
    assert ready.extended_headers and ready.structured_replies


def test_export_name_with_and_without_zeroes():
    ready = feed(started(), option(1, b""))
    assert isinstance(ready, Ready) and len(ready.reply) == 10
    hs = ServerHandshake()
    hs.receive_data(struct.pack(">I", 1))  # no NBD_FLAG_C_NO_ZEROES
    ready = feed(hs, option(1, b""))
    assert len(ready.reply) == 10 + 124 and struct.unpack_from(">Q", ready.reply)[0] == 1 << 20
    assert isinstance(feed(started(), option(1, b"nope")), Closed)


def test_abort():
    event = feed(started(), option(2))
    assert isinstance(event, Closed) and replies(event.reply)[0][1] == ACK


def test_tls_modes():
    assert replies(feed(started(), option(5)).data)[0][1] == 2**31 + 2  # tls off: NBD_REP_ERR_POLICY
    hs = started(tls="require")
    assert replies(feed(hs, option(7, go_data())).data)[0][1] == ERR_TLS_REQD
    assert replies(feed(hs, option(8)).data)[0][1] == ERR_TLS_REQD
    event = feed(hs, option(5))
    assert isinstance(event, StartTLS) and replies(event.data)[0][1] == ACK
    hs.tls_established()
    assert replies(feed(hs, option(5)).data)[0][1] == ERR_INVALID  # already on
    assert isinstance(feed(hs, option(7, go_data())), Ready)
    assert isinstance(feed(started(tls="require"), option(1, b"")), Closed)


def test_starttls_forgets_what_was_negotiated():
    hs = started(tls="on")
    feed(hs, option(8))
    assert isinstance(feed(hs, option(5)), StartTLS)
    hs.tls_established()
    assert not feed(hs, option(7, go_data())).structured_replies


def test_no_events_after_the_end():
    hs = started()
    feed(hs, option(7, go_data()))
    with pytest.raises(LocalProtocolError, match="already over"):
        hs.next_event()


def test_the_handshake_never_opens_an_export_itself():
    hs = started()
    hs.receive_data(option(7, go_data("second")))
    assert hs.next_event() == OpenExport("second", keep=True)
    assert hs.state is State.ANSWER


def test_a_driver_that_skips_an_answer_poisons_the_machine():
    hs = started()
    hs.receive_data(option(3))
    assert hs.next_event() == ListExports()
    with pytest.raises(LocalProtocolError, match="answer ListExports"):
        hs.next_event()
    assert hs.state is State.ERROR
    with pytest.raises(LocalProtocolError, match="failed earlier"):
        hs.exports_listed([])
    with pytest.raises(LocalProtocolError, match="failed earlier"):
        hs.receive_data(b"x")


def test_answering_what_was_not_asked_is_refused():
    hs = started()
    with pytest.raises(LocalProtocolError, match="OpenExport was not asked"):
        hs.export_opened(ExportInfo("x", 1, HAS_FLAGS, (1, 4096, 1 << 25)))
    hs.receive_data(option(3))
    assert hs.next_event() == ListExports()
    with pytest.raises(LocalProtocolError, match="OpenExport was not asked"):
        hs.export_refused("no")


def test_a_refused_open_is_an_error_reply_and_the_handshake_goes_on():
    hs = started()
    hs.receive_data(option(7, go_data("disk")))
    assert isinstance(hs.next_event(), OpenExport)
    hs.export_refused("disk: cannot open: Permission denied", unknown=False)
    event = hs.next_event()
    ERR_PLATFORM = 2**31 + 4
    assert replies(event.data) == [(7, ERR_PLATFORM, b"disk: cannot open: Permission denied")]
    assert hs.next_event() == NeedData(16)


def meta_query(name: str, *queries: str) -> bytes:
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


def test_meta_contexts_come_from_the_driver_and_are_numbered_by_set():
    hs, catalog = started(), Catalog()
    feed(hs, option(8), catalog)
    listed = replies(feed(hs, option(9, meta_query("second", "qemu:")), catalog).data)
    assert [(r[1], r[2][4:]) for r in listed] == [(META, b"qemu:dirty-bitmap:b0"),
                                                 (META, b"qemu:allocation-depth"), (ACK, b"")]
    assert all(struct.unpack_from(">I", r[2])[0] == 0 for r in listed[:-1])  # LIST sends id 0
    listed = replies(feed(hs, option(9, meta_query("", "qemu:dirty-bitmap:")), catalog).data)
    assert [r[2][4:] for r in listed[:-1]] == [b"qemu:dirty-bitmap:b0"]
    # SET: an unknown context (and a namespace query) is left out, the rest is chosen.
    chosen = replies(feed(hs, option(10, meta_query("", "qemu:dirty-bitmap:nope", "qemu:dirty-bitmap:b0",
                                                    "qemu:", "base:allocation")), catalog).data)
    assert [(r[1], r[2][4:]) for r in chosen] == [(META, b"qemu:dirty-bitmap:b0"),
                                                 (META, b"base:allocation"), (ACK, b"")]
    ids = {r[2][4:].decode(): struct.unpack_from(">I", r[2])[0] for r in chosen[:-1]}
    assert sorted(ids.values()) == [1, 2]
    assert catalog.asked_contexts == ["second", "", ""]
    ready = feed(hs, option(7, go_data()), catalog)
    assert ready.meta_contexts == {i: name for name, i in ids.items()}


def test_block_status_payload_flag_needs_extended_headers_and_contexts():
    BLOCK_STAT_PAYLOAD = 1 << 12
    for extended, contexts, expected in ((True, True, True), (True, False, False), (False, True, False)):
        hs = started()
        feed(hs, option(11 if extended else 8))
        if contexts:
            feed(hs, option(10, meta_query("", "base:allocation")))
        ready = feed(hs, option(7, go_data()))
        assert bool(ready.export.flags & BLOCK_STAT_PAYLOAD) is expected, (extended, contexts)
