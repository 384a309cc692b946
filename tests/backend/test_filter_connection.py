"""FilterConnection's pass-through binding, zero-copy reads included."""

from pynbd.backend import Connection, FilterConnection


class Disk(Connection):
    def __init__(self) -> None:
        self.data = bytearray(b"abcdefgh")

    def get_size(self) -> int:
        return len(self.data)

    def pread(self, buf, offset, flags):
        buf[:] = self.data[offset:offset + len(buf)]

    def pread_buffers(self, count, offset, flags):
        return [memoryview(self.data)[offset:offset + count]]


class PassThrough(FilterConnection):
    pass


class Upper(FilterConnection):
    def pread(self, buf, offset, flags):
        self.next.pread(buf, offset, flags)
        buf[:] = bytes(buf).upper()


def read(conn: Connection, count: int, offset: int) -> bytes:
    buffers = conn.pread_buffers(count, offset, 0)
    if buffers is not None:
        return b"".join(bytes(b) for b in buffers)
    buf = bytearray(count)
    conn.pread(memoryview(buf), offset, 0)
    return bytes(buf)


def test_untouched_methods_are_the_lower_layers_own():
    disk = Disk()
    layer = PassThrough(disk)
    assert layer.pread == disk.pread and layer.pread_buffers == disk.pread_buffers
    assert read(layer, 3, 2) == b"cde"


def test_a_filter_that_changes_reads_never_leaks_the_lower_buffers():
    layer = Upper(PassThrough(Disk()))
    assert layer.pread_buffers(3, 2, 0) is None
    assert read(layer, 3, 2) == b"CDE"
