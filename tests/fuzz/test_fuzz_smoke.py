"""CI's share of the fuzzing: a 30-second smoke of ``make fuzz`` (every target,
about 2.7 s each, fixed seed) and hypothesis's structure-aware properties of
the sans-IO cores.

The smoke allows 5 s per input instead of ``make fuzz``'s 1 s, because CI
machines are shared: a scheduling stall is not a hang worth failing on. It
runs a fifteenth of ``make fuzz``'s inputs at most, so that what it covers
does not depend on the machine's speed.
"""

from __future__ import annotations

import struct

from fuzz_cores import (
    CONTEXTS,
    QUERIES,
    ClientTarget,
    check_oracle,
    drive_handshake,
    drive_requests,
    terms_from,
)
from fuzz_main import PLAN, campaign
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynbd.proto import wire
from pynbd.proto.constants import Opt
from pynbd.proto.server_transmission import ServerTransmission

SMOKE_SECONDS_PER_TARGET = 2.7
SMOKE_SCALE = 1 / 15  # at most 1,000 inputs per live server, 16,000 per pure core


def test_fuzz_smoke(tmp_path):
    report = campaign(PLAN, scale=SMOKE_SCALE, seconds=SMOKE_SECONDS_PER_TARGET, seed=1,
                      hang_seconds=5.0, crashes=tmp_path)
    print("\n".join(report.lines()))
    assert report.crashes == 0 and report.hangs == 0, "\n".join(report.lines())
    assert report.fds[0] == report.fds[1], f"file descriptors {report.fds}"
    assert report.threads[0] == report.threads[1], f"threads {report.threads}"
    assert all(s.inputs > 0 for s in report.stats)


# ------------------------------------------------- structure-aware properties

names = st.sampled_from(["", "second", "odd", "bad", "nosuch", "é", "x" * 5000])
infos = st.lists(st.integers(0, 0xFFFF), max_size=4)
options = st.one_of(
    st.builds(lambda n: wire.option_request(Opt.EXPORT_NAME, n.encode()), names),
    st.builds(lambda n, i: wire.option_request(Opt.GO, wire.info_request(n, i)), names, infos),
    st.builds(lambda n, i: wire.option_request(Opt.INFO, wire.info_request(n, i)), names, infos),
    st.builds(lambda o, n, q: wire.option_request(o, wire.meta_context_request(n, q)),
              st.sampled_from([Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT]), names,
              st.lists(st.sampled_from(QUERIES + CONTEXTS), max_size=4)),
    st.builds(lambda o, d: wire.option_request(o, d),
              st.integers(0, 0xFFFFFFFF), st.binary(max_size=32)),
    st.sampled_from([wire.option_request(o) for o in Opt]),
)
requests = st.builds(
    lambda f, c, o, n: struct.pack(">IHHQQI", 0x25609513, f, c, 1, o, n),
    st.integers(0, 0xFFFF), st.integers(0, 9),
    st.one_of(st.integers(0, 1 << 21), st.integers(0, (1 << 64) - 1)),
    st.one_of(st.integers(0, 1 << 16), st.integers(0, 0xFFFFFFFF)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.integers(0, 7), flags=st.sampled_from([0, 1, 2, 3, 0x100]),
       opts=st.lists(options, max_size=8), tail=st.lists(requests, max_size=6),
       cut=st.integers(0, 1 << 16))
def test_handshake_never_breaks(config, flags, opts, tail, cut):
    """Any option sequence (cut anywhere) ends in a reply, Closed or Ready: never an exception."""
    data = bytes([config]) + struct.pack(">I", flags) + b"".join(opts) + b"".join(tail)
    drive_handshake(data[:len(data) - cut % (len(data) + 1) // 2])


@settings(max_examples=300, deadline=None)
@given(head=st.binary(min_size=6, max_size=6), tail=st.lists(requests, max_size=8))
def test_transmission_checks_hold(head, tail):
    """Whatever the terms, an accepted request is inside the export and keeps the rules."""
    tx = ServerTransmission(terms_from(head))
    if tx.extended:
        return  # the requests strategy builds compact headers
    data = b"".join(tail)
    drive_requests(tx, data, 0, round_trip=True)
    for pos in range(0, len(data), 28):
        flags, cmd, _, offset, length, _ = tx.parse_request(data, pos)
        if tx.check(flags, cmd, offset, length) is None:
            check_oracle(tx, flags, cmd, offset, length)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=2048))
def test_client_parser_takes_any_bytes(data):
    ClientTarget().run(data)
