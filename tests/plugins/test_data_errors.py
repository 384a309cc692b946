"""Malformed data expressions: one line naming the offset, exit status 1."""

from __future__ import annotations

import pytest

from nbdtest import PYNBD, run
from pynbd.backend import ConfigError
from pynbd.backend.stack import Stack

CASES = [
    ("(1 2))", "data: unexpected ')' at offset 5"),
    ("( 1 2 ) )", "data: unexpected ')' at offset 8"),
    ("1 2 (3", "data: unmatched '(' at offset 4"),
    ("256", "data: byte 256 is out of range 0..255 at offset 0"),
    ("1 @-5", "data: @-5 goes before the start (the offset is 1) at offset 2"),
    ('1 "abc', "data: unterminated string at offset 2"),
    ("<(exit 3)", "data: <(command) failed with exit status 3 at offset 0"),
    ("1 <(kill -9 $$)", "data: <(command) was killed by signal 9 at offset 2"),
    ("<(true", "data: unmatched '(' in <(command) at offset 1"),
    ("<nonexistent-file", "data: <nonexistent-file: No such file or directory at offset 0"),
    ("1*", "data: expected a number after * at offset 2"),
    ("1*x", "data: expected a number after * at offset 2"),
    ("$nope_not_set", "data: $nope_not_set: variable not found at offset 0"),
    ("\\foo", "data: \\foo is not defined at offset 0"),
    ("( 1 -> \\a ) \\a", "data: \\a is not defined at offset 12"),
    ("1 [2:1]", "data: [2:1] is not a valid slice of 1 bytes at offset 2"),
    ("(1 2 3)[1:10]", "data: [1:10] is not a valid slice of 3 bytes at offset 7"),
    ("(1 2 3)[1 2]", "data: expected ':' in [N:M] at offset 10"),
    ("le16:70000", "data: le16: 70000 is out of range 0..65535 at offset 5"),
    ("be32:", "data: expected a number after be32: at offset 5"),
    ("@^3", "data: @^3: the alignment must be a power of 2 at offset 0"),
    ("x", "data: unexpected 'x' at offset 0"),
    ("12ab", "data: unexpected 'a' at offset 2"),
    ("1 -> 2", "data: expected \\NAME after -> at offset 5"),
    ("$v", "data: $v: unexpected ')' at offset 3"),
]


@pytest.mark.parametrize(("expr", "message"), CASES)
def test_message_names_the_offset(expr, message):
    with pytest.raises(ConfigError) as info:
        Stack.from_args("data", [expr, "v=1 2)"])
    assert str(info.value) == message


@pytest.mark.parametrize("args", [
    ["data=1", "raw=x"],
    ["base64=@@@"],
    ["size=1M"],
    ["1", "allocator=bogus"],
])
def test_bad_parameters(args):
    with pytest.raises(ConfigError, match="^data: "):
        Stack.from_args("data", args)


@pytest.mark.parametrize(("expr", "message"), [
    ("( 0x55 0xAA ) )", "pynbd: error: data: unexpected ')' at offset 14"),
    ("<(exit 7)", "pynbd: error: data: <(command) failed with exit status 7 at offset 0"),
])
def test_serve_prints_one_line_and_exits_1(expr, message):
    result = run([*PYNBD, "serve", "-U", "-", "data", expr, "--run", "true"], check=False)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [message]


def test_nbdkit_refuses_the_same_expressions():
    """The oracle agrees these are errors (its wording differs)."""
    for expr in ("(1 2))", "1 2 (3", "256", "@-5", "<(exit 3)", "\\foo", "(1 2 3)[1:10]", "@^3"):
        assert run(["nbdkit", "-U", "-", "data", expr, "--run", "true"], check=False).returncode == 1
