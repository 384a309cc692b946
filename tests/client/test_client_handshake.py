"""The client handshake state machine, driven with byte strings only."""

import pytest

from pynbd.proto import wire
from pynbd.proto.client_handshake import (
    TRANSITIONS,
    ClientHandshake,
    HandshakeConfig,
    NeedData,
    Negotiating,
    OptionDone,
    OptionRefused,
    Ready,
    Send,
    StartTLS,
    State,
)
from pynbd.proto.constants import (
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    NBDMAGIC,
    OLDSTYLE_MAGIC,
    Opt,
    Rep,
)
from pynbd.proto.errors import LocalProtocolError, RemoteProtocolError

GREETING = wire.greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
EXPORT_INFO = wire.option_reply(Opt.GO, Rep.INFO, wire.info_export(1 << 20, 0x1 | 0x4))


def run(hs: ClientHandshake, server: bytes) -> tuple[list[bytes], object]:
    """Feed the server's bytes on demand; return what the client sent and the final event."""
    sent: list[bytes] = []
    while True:
        event = hs.next_event()
        if isinstance(event, NeedData):
            if not server:
                return sent, event
            chunk, server = server[:event.size], server[event.size:]
            hs.receive_data(chunk)
        elif isinstance(event, Send):
            sent.append(event.data)
        else:
            return sent, event


def options_sent(sent: list[bytes]) -> list[int]:
    return [wire.parse_option_header(s[:16])[0] for s in sent[1:]]


def test_default_negotiation_reaches_ready():
    server = (GREETING
              + wire.option_reply(Opt.EXTENDED_HEADERS, Rep.ERR_UNSUP)
              + wire.option_reply(Opt.STRUCTURED_REPLY, Rep.ACK)
              + wire.option_reply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT,
                                  wire.meta_context_reply_payload(7, "base:allocation"))
              + wire.option_reply(Opt.SET_META_CONTEXT, Rep.ACK)
              + EXPORT_INFO
              + wire.option_reply(Opt.GO, Rep.INFO, wire.info_block_size(1, 4096, 1 << 25))
              + wire.option_reply(Opt.GO, Rep.INFO, wire.info_description("a disk"))
              + wire.option_reply(Opt.GO, Rep.ACK))
    hs = ClientHandshake(HandshakeConfig(export_name="e", meta_contexts=["base:allocation"]))
    sent, event = run(hs, server)
    assert isinstance(event, Ready)
    assert sent[0] == wire.CLIENT_FLAGS.pack(3)
    assert options_sent(sent) == [Opt.EXTENDED_HEADERS, Opt.STRUCTURED_REPLY,
                                  Opt.SET_META_CONTEXT, Opt.GO]
    neg = event.negotiated
    assert (neg.size, neg.structured_replies, neg.extended_headers) == (1 << 20, True, False)
    assert neg.meta_contexts == {7: "base:allocation"}
    assert neg.block_size == (1, 4096, 1 << 25) and neg.description == "a disk"
    assert hs.state is State.READY


def test_missing_export_is_refused_with_enoent():
    server = GREETING + wire.option_reply(Opt.GO, Rep.ERR_UNKNOWN, b"no such thing")
    hs = ClientHandshake(HandshakeConfig(export_name="x", extended_headers=False,
                                         structured_replies=False))
    with pytest.raises(OptionRefused) as info:
        run(hs, server)
    assert info.value.errno == 2 and "no such export" in str(info.value)
    assert hs.state is State.CLOSED


def test_tls_required_by_server_says_so():
    tls_reqd = Rep.ERR_TLS_REQD
    server = (GREETING + wire.option_reply(Opt.EXTENDED_HEADERS, tls_reqd)
              + wire.option_reply(Opt.STRUCTURED_REPLY, tls_reqd)
              + wire.option_reply(Opt.GO, tls_reqd))
    with pytest.raises(OptionRefused, match="requires TLS"):
        run(ClientHandshake(), server)


def test_starttls_then_negotiation_continues():
    hs = ClientHandshake(HandshakeConfig(tls=True, extended_headers=False))
    sent, event = run(hs, GREETING + wire.option_reply(Opt.STARTTLS, Rep.ACK))
    assert isinstance(event, StartTLS) and options_sent(sent) == [Opt.STARTTLS]
    hs.tls_established()
    sent, event = run(hs, wire.option_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    assert wire.parse_option_header(sent[0][:16])[0] == Opt.STRUCTURED_REPLY
    assert hs.negotiated.tls


def test_starttls_refused_when_required():
    hs = ClientHandshake(HandshakeConfig(tls=True))
    with pytest.raises(OptionRefused, match="TLS"):
        run(hs, GREETING + wire.option_reply(Opt.STARTTLS, Rep.ERR_UNSUP))


def test_go_unsupported_falls_back_to_export_name():
    server = (GREETING + wire.option_reply(Opt.GO, Rep.ERR_UNSUP)
              + wire.export_name_reply(4096, 1, no_zeroes=True))
    hs = ClientHandshake(HandshakeConfig(export_name="old", extended_headers=False,
                                         structured_replies=False))
    sent, event = run(hs, server)
    assert isinstance(event, Ready) and event.negotiated.size == 4096
    assert options_sent(sent) == [Opt.GO, Opt.EXPORT_NAME] and sent[-1].endswith(b"old")


def test_oldstyle_server():
    server = (wire.U64.pack(NBDMAGIC) + wire.U64.pack(OLDSTYLE_MAGIC) + wire.U64.pack(512)
              + wire.U32.pack(1) + bytes(124))
    sent, event = run(ClientHandshake(), server)
    assert sent == [] and isinstance(event, Ready)
    assert event.negotiated.protocol == "oldstyle" and event.negotiated.size == 512


def test_option_mode_list_info_go():
    hs = ClientHandshake(HandshakeConfig(opt_mode=True, extended_headers=False))
    _, event = run(hs, GREETING + wire.option_reply(Opt.STRUCTURED_REPLY, Rep.ACK))
    assert isinstance(event, Negotiating)
    hs.opt_list()
    _, event = run(hs, wire.option_reply(Opt.LIST, Rep.SERVER, wire.server_reply_payload("a", "d"))
                   + wire.option_reply(Opt.LIST, Rep.ACK))
    assert isinstance(event, OptionDone) and event.result == [("a", "d")]
    hs.set_export_name("nope")
    hs.opt_go()
    with pytest.raises(OptionRefused):
        run(hs, wire.option_reply(Opt.GO, Rep.ERR_UNKNOWN))
    assert hs.state is State.NEGOTIATING  # option mode survives a refusal
    hs.set_export_name("a")
    hs.opt_go()
    _, event = run(hs, EXPORT_INFO + wire.option_reply(Opt.GO, Rep.ACK))
    assert isinstance(event, Ready)


@pytest.mark.parametrize("server, message", [
    (b"XXXXXXXX" + bytes(10), "NBDMAGIC"),
    (wire.U64.pack(NBDMAGIC) + b"12345678" + bytes(2), "unknown NBD protocol magic"),
    (GREETING + wire.option_reply(Opt.GO, Rep.ACK), "answered option"),
    (GREETING + wire.option_reply(Opt.EXTENDED_HEADERS, Rep.SERVER, b"\0\0\0\0"), "unexpected reply"),
])
def test_protocol_violations(server, message):
    with pytest.raises(RemoteProtocolError, match=message):
        run(ClientHandshake(), server)


def test_bad_option_reply_magic():
    bad = bytearray(wire.option_reply(Opt.EXTENDED_HEADERS, Rep.ACK))
    bad[0] ^= 0xFF
    with pytest.raises(RemoteProtocolError, match="magic"):
        run(ClientHandshake(), GREETING + bytes(bad))


def test_connection_lost_names_the_state():
    hs = ClientHandshake()
    run(hs, GREETING)
    lost = hs.connection_lost()
    assert isinstance(lost, RemoteProtocolError) and "NBD_OPT_EXTENDED_HEADERS" in str(lost)


@pytest.mark.parametrize("late_call", [
    lambda hs: hs.next_event(),
    lambda hs: hs.receive_data(b"more"),
    lambda hs: hs.tls_established(),
    lambda hs: hs.opt_list(),
])
def test_a_remote_error_breaks_the_machine_for_good(late_call):
    hs = ClientHandshake()
    with pytest.raises(RemoteProtocolError) as first:
        run(hs, b"XXXXXXXX" + bytes(8))
    assert hs.state is State.ERROR
    with pytest.raises(LocalProtocolError, match="earlier error.*NBDMAGIC") as later:
        late_call(hs)
    assert later.value.__cause__ is first.value


@pytest.mark.parametrize("misuse, message", [
    (lambda hs: hs.opt_go(), "opt_go needs option mode"),
    (lambda hs: hs.opt_abort(), "opt_abort needs option mode"),
    (lambda hs: hs.tls_established(), "TLS established while"),
    (lambda hs: hs.next_event(), "transmission phase; nothing to read"),
])
def test_misuse_is_a_local_error_and_breaks_the_machine(misuse, message):
    hs = ClientHandshake(HandshakeConfig(extended_headers=False, structured_replies=False))
    _, event = run(hs, GREETING + EXPORT_INFO + wire.option_reply(Opt.GO, Rep.ACK))
    assert isinstance(event, Ready)
    with pytest.raises(LocalProtocolError, match=message) as first:
        misuse(hs)
    assert hs.state is State.ERROR
    with pytest.raises(LocalProtocolError) as later:
        hs.next_event()
    assert later.value.__cause__ is first.value and message.split()[0] in str(later.value)


def test_a_refused_option_is_an_answer_not_a_breakage():
    hs = ClientHandshake(HandshakeConfig(opt_mode=True, extended_headers=False,
                                         structured_replies=False))
    run(hs, GREETING)
    hs.opt_list()
    with pytest.raises(OptionRefused):
        run(hs, wire.option_reply(Opt.LIST, Rep.ERR_POLICY))
    assert hs.state is State.NEGOTIATING
    hs.opt_abort()  # still usable
    assert hs.state is State.CLOSED


def test_transition_table_is_closed():
    for state, targets in TRANSITIONS.items():
        assert targets <= set(State), state
        assert state is State.ERROR or State.ERROR in targets, state  # any state may fail
    assert TRANSITIONS[State.CLOSED] == {State.ERROR}
    assert TRANSITIONS[State.ERROR] == frozenset()  # and failing is final
