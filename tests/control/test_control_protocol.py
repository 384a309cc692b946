"""The control protocol as bytes (no sockets), the Command API and the command table."""

from __future__ import annotations

import json

import pytest

from pynbd.backend import Command, ConfigError, ControlError
from pynbd.control.protocol import (
    CLOSED,
    MAX_LINE,
    NEED_DATA,
    ControlProtocolError,
    Invalid,
    Reply,
    Request,
    RequestReader,
    error_line,
    ok_line,
    parse_reply,
    parse_request,
    request_line,
)
from pynbd.control.server import CommandTable


def events(*chunks: bytes, eof: bool = False) -> list[object]:
    reader = RequestReader()
    out: list[object] = []
    for chunk in chunks:
        reader.receive_data(chunk)
        while (event := reader.next_event()) is not NEED_DATA:
            out.append(event)
    if eof:
        reader.receive_eof()
        out.append(reader.next_event())
    return out


def test_requests_split_anywhere_and_in_order():
    data = b'{"command": ["status"]}\n{"command": ["snapshot", "create", "a"], "id": 7}\r\n'
    for cut in range(len(data) + 1):
        assert events(data[:cut], data[cut:]) == [
            Request(("status",)), Request(("snapshot", "create", "a"), 7, True)]


def test_blank_lines_are_ignored_and_eof_after_a_whole_line_is_clean():
    assert events(b'\n  \r\n{"command":["help"]}\n\n', eof=True) == [Request(("help",)), CLOSED]


def test_id_may_be_any_json_value_even_null():
    assert events(b'{"command":["x"],"id":null}\n') == [Request(("x",), None, True)]
    assert events(b'{"command":["x"],"id":{"a":[1]}}\n') == [Request(("x",), {"a": [1]}, True)]


@pytest.mark.parametrize("line, message", [
    (b"nonsense", "invalid JSON: Expecting value"),
    (b'{"command": ["status"]', "invalid JSON: Expecting ',' delimiter"),
    (b"[1, 2]", "a request is a JSON object"),
    (b'"status"', "a request is a JSON object"),
    (b"{}", '"command" must be a non-empty list of strings'),
    (b'{"command": []}', '"command" must be a non-empty list of strings'),
    (b'{"command": "status"}', '"command" must be a non-empty list of strings'),
    (b'{"command": ["snapshot", 1]}', '"command" must be a non-empty list of strings'),
    (b'{"command": ["status"], "verbose": true}', "unknown key in request: 'verbose'"),
    (b"\xff\xfe\x00binary", "the line is not UTF-8 (byte 0)"),
    (b"[" * 50000, "invalid JSON: nested too deeply"),
])
def test_bad_lines_are_invalid_events_and_the_next_request_still_parses(line, message):
    got = events(line + b"\n" + b'{"command":["status"]}\n')
    assert len(got) == 2
    assert isinstance(got[0], Invalid) and got[0].message.startswith(message)
    assert got[1] == Request(("status",))


def test_an_invalid_request_keeps_its_id_for_the_error():
    [event] = events(b'{"command": 5, "id": "q1"}\n')
    assert event == Invalid('"command" must be a non-empty list of strings', "q1", True)
    assert error_line(event.message, event.id, event.has_id) == \
        b'{"error":"\\"command\\" must be a non-empty list of strings","id":"q1"}\n'


def test_a_line_over_the_limit_is_one_error_however_it_arrives():
    long = b'{"command":["echo","' + b"x" * MAX_LINE + b'"]}'
    good = b'{"command":["status"]}\n'
    whole = events(long + b"\n" + good)
    pieces = events(*(long[i:i + 1000] for i in range(0, len(long), 1000)), b"\n" + good)
    for got in (whole, pieces):
        assert got == [Invalid(f"line longer than {MAX_LINE} bytes"), Request(("status",))]


def test_the_buffer_stays_bounded_while_skipping_an_endless_line():
    reader = RequestReader()
    reader.receive_data(b"x" * (MAX_LINE + 1))
    assert isinstance(reader.next_event(), Invalid)
    for _ in range(100):
        reader.receive_data(b"y" * 65536)
        assert reader.next_event() is NEED_DATA
    assert len(reader._buffer) == 0


def test_a_line_of_exactly_the_limit_is_accepted():
    padding = MAX_LINE - len(b'{"command":["echo",""]}')
    line = b'{"command":["echo","' + b"z" * padding + b'"]}'
    assert len(line) == MAX_LINE
    assert events(line + b"\n") == [Request(("echo", "z" * padding))]


def test_half_a_line_then_eof_is_dropped():
    assert events(b'{"command":["sta', eof=True) == [CLOSED]
    reader = RequestReader()
    reader.receive_eof()
    with pytest.raises(ControlProtocolError):
        reader.receive_data(b"more")


def test_a_lone_surrogate_still_gets_a_reply():
    [event] = events(b'{"command": ["echo", "\\ud800"]}\n')
    assert event == Request(("echo", "\ud800"))
    assert error_line("unknown command '\ud800'") == b'{"error":"unknown command \'\\ud800\'"}\n'
    assert ok_line(["\ud800", "\u00e9"]) == b'{"ok":["\\ud800","\\u00e9"]}\n'


def test_replies_and_the_client_half():
    assert ok_line({"a": [1, "é"]}) == '{"ok":{"a":[1,"é"]}}\n'.encode()
    assert ok_line(None, 3, True) == b'{"ok":null,"id":3}\n'
    assert error_line("no") == b'{"error":"no"}\n'
    assert parse_request(request_line(["a", "b"], "x", True).rstrip()) == Request(("a", "b"), "x", True)
    assert parse_reply(b'{"ok":[1],"id":2}\n') == Reply(True, [1], 2)
    assert parse_reply(b'{"error":"bad"}') == Reply(False, "bad")
    for bad in (b"", b"[]", b'{"error": 5}', b"\xff"):
        with pytest.raises(ControlProtocolError):
            parse_reply(bad)
    with pytest.raises(TypeError):
        ok_line({1, 2})


# ---------------------------------------------------------------- the Command API

def test_command_usage_and_arity():
    create = Command(("snapshot", "create"), ("NAME",), "take one", lambda name: {"name": name})
    assert create.name == "snapshot create" and create.usage == "snapshot create NAME"
    assert create.invoke(["a"]) == {"name": "a"}
    with pytest.raises(ControlError, match=r"^usage: snapshot create NAME$"):
        create.invoke([])
    with pytest.raises(ControlError, match="usage"):
        create.invoke(["a", "b"])
    rest = Command(("echo",), ("FIRST", "*REST"), "echo", lambda *w: list(w))
    assert rest.usage == "echo FIRST [REST...]"
    assert rest.invoke(["1"]) == ["1"] and rest.invoke(["1", "2", "3"]) == ["1", "2", "3"]
    with pytest.raises(ControlError):
        rest.invoke([])


@pytest.mark.parametrize("words, args", [
    ((), ()), (("Snapshot",), ()), (("two words",), ()), (("x",), ("name",)),
    (("x",), ("*REST", "NAME")), (("x",), ("A B",)),
])
def test_malformed_commands_are_refused_when_declared(words, args):
    with pytest.raises(ValueError):
        Command(words, args, "", lambda: None)


def table() -> CommandTable:
    return CommandTable([
        Command(("snapshot", "create"), ("NAME",), "create", lambda n: f"created {n}"),
        Command(("snapshot", "list"), (), "list", lambda: []),
        Command(("snapshot",), ("*WORDS",), "fallback", lambda *w: ["fallback", *w]),
        Command(("status",), (), "status", lambda: {"pid": 1}),
    ])


def test_the_longest_matching_words_win():
    t = table()
    assert t.run(("snapshot", "create", "a")) == "created a"
    assert t.run(("snapshot", "list")) == []
    assert t.run(("snapshot", "other", "x")) == ["fallback", "other", "x"]
    assert t.help()[0] == {"command": "snapshot create NAME", "help": "create"}


def test_unknown_commands_and_wrong_arguments_are_control_errors():
    t = CommandTable([Command(("snapshot", "create"), ("NAME",), "c", lambda n: n),
                      Command(("snapshot", "list"), (), "l", lambda: [])])
    with pytest.raises(ControlError, match=r"unknown command 'snapshot'; did you mean: "
                                           r"snapshot create, snapshot list"):
        t.run(("snapshot",))
    with pytest.raises(ControlError, match=r"unknown command 'frobnicate'; 'help' lists"):
        t.run(("frobnicate",))
    with pytest.raises(ControlError, match=r"usage: snapshot list"):
        t.run(("snapshot", "list", "extra"))


def test_a_reply_never_raises():
    t = CommandTable([Command(("bug",), (), "", lambda: 1 / 0),
                      Command(("set",), (), "", lambda: {1}),
                      Command(("no",), (), "", lambda: (_ for _ in ()).throw(ControlError("nope")))])
    assert json.loads(t.reply(("bug",), 1, True)) == {
        "error": "internal error: ZeroDivisionError: division by zero", "id": 1}
    assert json.loads(t.reply(("set",), None, False))["error"].startswith("internal error: TypeError")
    assert json.loads(t.reply(("no",), None, False)) == {"error": "nope"}
    assert json.loads(t.reply(("nothing",), None, False))["error"].startswith("unknown command")


def test_two_layers_may_not_register_the_same_words():
    with pytest.raises(ConfigError, match="two layers register the control command 'a b'"):
        CommandTable([Command(("a", "b"), (), "", lambda: 1), Command(("a", "b"), (), "", lambda: 2)])
