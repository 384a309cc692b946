"""The checked layer boundary (backend.layer): cached answers, checks, emulation,
pass-through binding and -v logging."""

import logging

import pytest

from pynbd.backend import (
    DATA_METHODS,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FUA_EMULATE,
    Connection,
    Extent,
    Filter,
    FilterConnection,
    LayerCallError,
    OpenContext,
    Plugin,
)
from pynbd.backend.layer import Layer, open_layer
from pynbd.backend.stack import Stack


class Disk(Connection):
    """Eight bytes that count the questions asked and the calls made."""

    def __init__(self) -> None:
        self.data = bytearray(b"abcdefgh")
        self.asked: dict[str, int] = {}
        self.calls: list[tuple[str, int, int, int]] = []

    def _ask(self, name: str) -> None:
        self.asked[name] = self.asked.get(name, 0) + 1

    def get_size(self) -> int:
        self._ask("get_size")
        return len(self.data)

    def can_write(self) -> bool:
        self._ask("can_write")
        return True

    def can_zero(self) -> bool:
        return True

    def can_flush(self) -> bool:
        return True

    def can_fua(self) -> int:
        return FUA_EMULATE

    def pread(self, buf, offset, flags):
        buf[:] = self.data[offset:offset + len(buf)]

    def pread_buffers(self, count, offset, flags):
        return [memoryview(self.data)[offset:offset + count]]

    def pwrite(self, buf, offset, flags):
        self.calls.append(("pwrite", len(buf), offset, flags))
        self.data[offset:offset + len(buf)] = buf

    def flush(self, flags):
        self.calls.append(("flush", 0, 0, flags))


class PassThrough(FilterConnection):
    pass


class Upper(FilterConnection):
    def pread(self, buf, offset, flags):
        self.next.pread(buf, offset, flags)
        buf[:] = bytes(buf).upper()


class Exploding(FilterConnection):
    """Overrides every call, yet says it leaves them all unchanged."""

    def passes_through(self):
        return DATA_METHODS

    def pread(self, buf, offset, flags):
        raise AssertionError("a pass-through call reached the filter")

    pread_buffers = pwrite = pread


def stacked(*filters: type[FilterConnection]) -> tuple[Layer, Disk]:
    disk = Disk()
    layer = open_layer(disk, "disk", readonly=False)
    for cls in filters:
        layer = open_layer(cls(layer, None, OpenContext()), cls.__name__.lower(), readonly=False)
    return layer, disk


def read(conn: Connection, count: int, offset: int) -> bytes:
    buffers = conn.pread_buffers(count, offset, 0)
    if buffers is not None:
        return b"".join(bytes(b) for b in buffers)
    buf = bytearray(count)
    conn.pread(memoryview(buf), offset, 0)
    return bytes(buf)


def test_answers_are_asked_once_per_open():
    layer, disk = stacked(PassThrough, PassThrough)
    for _ in range(5):
        assert layer.get_size() == 8 and layer.can_write()
        read(layer, 2, 0)
    assert disk.asked == {"get_size": 1, "can_write": 1}


def test_calls_a_filter_passes_through_never_reach_it():
    layer, disk = stacked(Exploding)
    assert read(layer, 3, 2) == b"cde"
    layer.pwrite(memoryview(b"XY"), 0, 0)
    assert disk.data.startswith(b"XY")


def test_a_filter_that_changes_reads_never_leaks_the_lower_buffers():
    layer, _ = stacked(PassThrough, Upper, PassThrough)
    assert layer.pread_buffers(3, 2, 0) is None
    assert read(layer, 3, 2) == b"CDE"


@pytest.mark.parametrize("call", [
    lambda layer: layer.pread(memoryview(bytearray(4)), 6, 0),
    lambda layer: layer.pread_buffers(1, 8, 0),
    lambda layer: layer.pwrite(memoryview(b"x"), -1, 0),
    lambda layer: layer.pread(memoryview(bytearray(1)), 0, FLAG_FUA),
    lambda layer: layer.zero(1, 0, FLAG_FAST_ZERO),
    lambda layer: layer.trim(1, 0, 0),
    lambda layer: layer.flush(FLAG_FUA),
])
def test_calls_outside_what_the_layer_offers_are_caller_bugs(call):
    layer, disk = stacked(PassThrough)
    with pytest.raises(LayerCallError, match="passthrough: "):
        call(layer)
    assert disk.calls == []


def test_a_read_only_open_cannot_write_whatever_the_plugin_says():
    layer = open_layer(Disk(), "disk", readonly=True)
    assert not layer.can_write() and not layer.can_zero() and not layer.can_fua()
    with pytest.raises(LayerCallError, match="cannot write"):
        layer.pwrite(memoryview(b"x"), 0, 0)


def test_fua_on_a_layer_that_emulates_it_is_a_write_then_a_flush():
    layer, disk = stacked()
    layer.pwrite(memoryview(b"zz"), 4, FLAG_FUA)
    assert disk.calls == [("pwrite", 2, 4, 0), ("flush", 0, 0, 0)]


def test_extents_of_a_layer_without_them_is_one_data_extent():
    layer, _ = stacked(PassThrough)
    assert list(layer.extents(8, 0, 0)) == [Extent(0, 8)]


def test_verbose_logs_each_call_at_each_layer(caplog):
    caplog.set_level(logging.DEBUG, logger="pynbd.layer")
    layer, _ = stacked(Upper)
    layer.pread(memoryview(bytearray(4)), 0, 0)
    lines = [r.getMessage() for r in caplog.records if r.name == "pynbd.layer"]
    assert lines == ["upper: pread count=4 offset=0 flags=0", "disk: pread count=4 offset=0 flags=0"]


class Shrink(Filter):
    """A filter that reports a size larger than the layer below: a bug the boundary catches."""

    name = "shrink"

    class connection(FilterConnection["Shrink"]):
        def get_size(self) -> int:
            return self.next.get_size() + 100


class Bytes(Plugin):
    name = "bytes"

    def open(self, ctx):
        return Disk()


def test_a_filter_reading_past_the_layer_below_fails_that_request_only():
    top = Stack(Bytes(), [Shrink()]).open(OpenContext())
    with pytest.raises(LayerCallError, match=r"bytes: pread count=10 offset=50 is outside .* size 8"):
        top.pread(memoryview(bytearray(10)), 50, 0)
    assert read(top, 2, 0) == b"ab"
