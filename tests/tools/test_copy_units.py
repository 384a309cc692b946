"""The pieces of pynbd copy on their own: options, zero detection, file extents, the plan."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading

import pytest

from pynbd.tools.copying.endpoint import Endpoint, Extent, Fanout
from pynbd.tools.copying.engine import Ramp, Slot
from pynbd.tools.copying.local import file_extents
from pynbd.tools.copying.options import UsageError, parse_args
from pynbd.tools.copying.plan import SLICE, Plan, Slices
from pynbd.tools.copying.zeroes import ZeroScanner

K = 1024


# ------------------------------------------------------------------ options

def test_options_anywhere_and_captive_groups():
    opts = parse_args(["-C4", "-p", "--", "[", "qemu-nbd", "-f", "qcow2", "x", "]", "--flush"])
    assert opts.connections == 4 and opts.progress and opts.progress_fd is None
    assert opts.source.kind == "captive"
    assert opts.source.command == ("qemu-nbd", "-f", "qcow2", "x")
    assert opts.destination.kind == "local" and opts.destination.text == "--flush"
    assert not opts.flush
    mixed = parse_args(["a.img", "-v", "b.img", "--flush"])
    assert mixed.verbose and mixed.flush and mixed.destination.text == "b.img"


def test_option_values_and_kinds():
    opts = parse_args(["--request-size", "64K", "-R", "8", "--progress=3", "--target-is-zero",
                       "--no-extents", "-S0", "nbd://h/e", "null:"])
    assert (opts.request_size, opts.requests, opts.progress_fd, opts.sparse) == (65536, 8, 3, 0)
    assert opts.destination_is_zero and not opts.extents
    assert (opts.source.kind, opts.destination.kind) == ("nbd", "null")
    assert parse_args(["-", "-"]).source.kind == "stdio"


def test_queue_size_bounds_requests():
    opts = parse_args(["--queue-size=1M", "--request-size=256K", "-R", "64", "a", "b"])
    assert opts.requests_in_flight == 4


def test_help_needs_no_endpoints():
    assert parse_args(["--help"]).help
    with pytest.raises(UsageError):
        parse_args([])


# ------------------------------------------------------------ zero detection

def runs(data: bytes, block: int = 4 * K) -> list[tuple[int, int, bool]]:
    buf = bytearray(data)
    return ZeroScanner(block, len(buf)).runs(buf, len(buf))


def test_zero_runs_whole_buffers():
    assert runs(bytes(64 * K)) == [(0, 64 * K, True)]
    assert runs(b"\1" * 64 * K) == [(0, 64 * K, False)]
    assert runs(b"") == []
    assert runs(b"\1" * 8 * K, block=0) == [(0, 8 * K, False)]


def test_zero_runs_mixed_and_partial_tail():
    data = b"\1" * 4 * K + bytes(8 * K) + b"\1" + bytes(4 * K - 1) + bytes(100)
    assert runs(data) == [(0, 4 * K, False), (4 * K, 8 * K, True), (12 * K, 4 * K, False),
                          (16 * K, 100, True)]


def test_zero_runs_looks_at_the_given_length_only():
    buf = bytearray(8 * K)
    buf[5 * K] = 1  # beyond the length asked about
    assert ZeroScanner(4 * K, 8 * K).runs(buf, 4 * K) == [(0, 4 * K, True)]


def test_zero_runs_from_an_offset_in_the_buffer():
    data = b"\1" * 4 * K + bytes(8 * K) + b"\1" + bytes(100)
    buf = bytearray(b"\1" * 123) + bytearray(data) + bytearray(b"\1" * 77)
    assert ZeroScanner(4 * K, len(data)).runs(buf, len(data), 123) == runs(data)
    assert ZeroScanner(4 * K, 8 * K).runs(buf, 8 * K, 123 + 4 * K) == [(0, 8 * K, True)]


def test_zero_runs_when_most_blocks_start_with_zero():
    """Past a few blocks starting with zero, the probes (last, middle, quarter bytes) pick
    the blocks compared whole: a byte anywhere else still makes a block data."""
    blocks = [bytearray(4 * K) for _ in range(32)]
    for i, block in enumerate(blocks):
        if i % 3 == 0:
            block[4 * K - 1] = 1  # a probed byte
        elif i % 3 == 1:
            block[1 + i] = 1  # a byte no probe looks at
    data = b"".join(blocks) + bytes(100)  # and a zero tail shorter than every probe but one
    expected = []
    for i in range(0, 30, 3):  # two data blocks, a zero one
        expected += [(i * 4 * K, 8 * K, False), ((i + 2) * 4 * K, 4 * K, True)]
    assert runs(data) == [*expected, (120 * K, 8 * K, False), (128 * K, 100, True)]


def test_slots_start_on_a_page_boundary():
    for size in (4 * K, 1024 * K):
        slot = Slot(size)
        assert len(slot.view) == size
        assert ctypes.addressof(ctypes.c_char.from_buffer(slot.view)) % mmap.PAGESIZE == 0
        slot.view[:4] = b"abcd"
        assert slot.buf[:4] == b"abcd"


# -------------------------------------------------------------- file extents

def test_file_extents(tmp_path):
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(4 * 1024 * K)
        f.seek(1024 * K)
        f.write(b"x" * 64 * K)
    with open(path, "rb") as f:
        extents = file_extents(f.fileno(), 0, 4 * 1024 * K)
        tail = file_extents(f.fileno(), 1024 * K + 4 * K, 2 * 1024 * K)
    data = [(o, n) for o, n, zero in extents if not zero]
    assert data == [(1024 * K, 64 * K)]
    assert sum(n for _, n, _ in extents) == 4 * 1024 * K
    assert tail[0] == (1024 * K + 4 * K, 60 * K, False) and tail[-1][2]


# ---------------------------------------------------------------------- plan

class FakeSource(Endpoint):
    def __init__(self, extents: list[Extent] | None) -> None:
        super().__init__("fake")
        self._extents = extents

    def extents(self, conn: int, count: int, offset: int) -> list[Extent] | None:
        if self._extents is None:
            return None
        return [e for e in self._extents if offset <= e[0] < offset + count]


def all_ops(plan: Plan) -> list[tuple[int, int, bool]]:
    ops = []
    while (op := plan.next()) is not None:
        ops.append(op)
    return ops


def test_plan_splits_data_and_keeps_zero_ranges_whole():
    size = 2 * SLICE
    source = FakeSource([(0, 600 * K, False), (600 * K, SLICE - 600 * K, True),
                         (SLICE, SLICE, True)])
    ops = all_ops(Plan(source, Slices(size), 256 * K, SLICE, True))
    assert ops[:3] == [(0, 256 * K, False), (256 * K, 256 * K, False), (512 * K, 88 * K, False)]
    assert ops[3:] == [(600 * K, SLICE - 600 * K, True), (SLICE, SLICE, True)]


def test_plan_without_extents_reads_everything():
    ops = all_ops(Plan(FakeSource(None), Slices(1000 * K), 256 * K, SLICE, True))
    assert [n for _, n, zero in ops if not zero] == [256 * K] * 3 + [232 * K]


def test_plan_for_a_stream_runs_until_stopped():
    plan = Plan(FakeSource(None), Slices(None), 64 * K, SLICE, False)
    first = [plan.next(), plan.next()]
    plan.stop(100 * K)
    assert [*first, plan.next()] == [(0, 64 * K, False), (64 * K, 64 * K, False), None]


def test_zero_runs_blocks_starting_with_zero():
    data = bytearray(os.urandom(64 * K).replace(b"\0", b"\1"))
    data[0:4 * K] = bytes(4 * K)
    data[8 * K] = 0  # starts with zero, but is data
    data[60 * K:] = bytes(4 * K)
    assert runs(bytes(data)) == [(0, 4 * K, True), (4 * K, 56 * K, False), (60 * K, 4 * K, True)]
    data[0:64 * K:4 * K] = bytes(16)  # every block starts with zero; only two are zero
    assert runs(bytes(data))[1] == (4 * K, 56 * K, False)


# -------------------------------------------------------------------- fanout

def test_fanout_waits_for_every_part_and_the_starter():
    calls: list[tuple[int, BaseException | None]] = []
    fan = Fanout(10, lambda n, error: calls.append((n, error)))
    parts = [fan.part() for _ in range(3)]
    for part in parts:
        part(1, None)
    assert calls == []  # the starter has not closed it yet
    fan.close()
    assert calls == [(10, None)]


def test_fanout_reports_the_first_error_once():
    calls: list[tuple[int, BaseException | None]] = []
    fan = Fanout(10, lambda n, error: calls.append((n, error)))
    first, second = OSError(5, "first"), OSError(28, "second")
    a, b = fan.part(), fan.part()
    fan.close()
    a(0, first)
    b(0, second)
    assert calls == [(10, first)]


def test_fanout_from_many_threads_finishes_exactly_once():
    calls: list[int] = []
    fan = Fanout(1, lambda n, error: calls.append(n))
    parts = [fan.part() for _ in range(400)]
    threads = [threading.Thread(target=lambda ps=parts[i::8]: [p(1, None) for p in ps])
               for i in range(8)]
    for t in threads:
        t.start()
    fan.close()
    for t in threads:
        t.join()
    assert calls == [1]


# ------------------------------------------------------------------ the ramp

class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ramp_through(lanes: int, rates: list[float], mib: int = 2048, slow: int = 0) -> Ramp:
    """Run a ramp whose copy goes at ``rates[k]`` MiB/s with k + 1 lanes in use, ``mib``
    MiB in all; the first ``slow`` MiB after the lane count changed go at half speed."""
    clock = Clock()
    ramp, done = Ramp(lanes, clock), 0
    step = 4 * 1024 * 1024
    active, since = ramp.active, 0
    for _ in range(mib // 4):
        if ramp.active != active:
            active, since = ramp.active, done
        rate = rates[active - 1] / (2 if done - since < slow * 1024 * 1024 else 1)
        clock.now += step / (rate * 1024 * 1024)
        done += step
        ramp.update(done)
    return ramp


@pytest.mark.parametrize("rates,used", [
    ([500, 900, 1300, 1700], 4),   # every lane helps: all in use
    ([900, 700, 1000, 2000], 1),   # a second lane slows it: one, never tries a third
    ([500, 1000, 1050, 2000], 2),  # the third gains under 10%: two
    ([900, 950], 1),               # -C 2 that gains 5%: one
])
def test_ramp_keeps_a_lane_only_while_it_raises_the_rate(rates, used):
    ramp = ramp_through(len(rates), rates)
    assert ramp.settled and ramp.active == used


def test_a_ramp_window_lasts_its_span_however_fast_the_copy():
    """At 3 GiB/s, 64 MiB go by in 21 ms: the window waits for ``SPAN`` before a lane
    is added, so a few time slices of noise cannot decide it."""
    fast = 3072
    span_mib = int(Ramp.SPAN * fast)
    early = ramp_through(2, [fast, 2 * fast], mib=(Ramp.WARMUP + Ramp.WINDOW) // 2**20 + 8)
    assert early.active == 1 and not early.settled
    late = ramp_through(2, [fast, 2 * fast], mib=Ramp.WARMUP // 2**20 + span_mib + 8)
    assert late.active == 2


def test_a_lane_is_measured_once_it_is_warm():
    """A lane added first fills its requests in flight (here: 24 MiB at half speed); a
    second lane that then copies 20% faster is kept."""
    assert ramp_through(2, [1000, 1200], slow=24).active == 2


def test_ramp_of_one_lane_is_settled_at_once():
    assert Ramp(1).settled and Ramp(1).active == 1
