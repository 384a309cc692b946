"""The memory plugin, driven by qemu-io, nbdsh and nbdinfo, against nbdkit's."""

import pytest
from plugin_helpers import config_error, extent_map, kind_at, nbd_script, qemu_io, zero_runs

from nbdtest import nbdsh, served

ALLOCATORS = ("sparse", "malloc", "zstd")
MAX = 2**63 - 1


def test_largest_disk_writes_near_the_end():
    with served("memory", str(MAX)) as srv:
        out = nbdsh(srv.uri, f"""
end = h.get_size()
h.pwrite(b"tail" * 1024, end - 4096 - 3)
h.pwrite(b"last", end - 4)
print(end, h.pread(8, end - 4096 - 3).decode(), h.pread(4, end - 4).decode())
print(h.pread(4, {MAX // 2}) == bytes(4))
""")
    assert out.split() == [str(MAX), "tailtail", "last", "True"]


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_allocator_round_trip(allocator):
    with served("memory", "8M", f"allocator={allocator}") as srv:
        qemu_io(srv.uri, "write -P 0x5a 1M 128k", "write -P 0xc3 98000 5000",
                "write -P 0x11 8384512 4096")
        qemu_io(srv.uri, "read -P 0x5a 1M 128k", "read -P 0xc3 98000 5000")
        out = nbdsh(srv.uri, """
d = h.pread(5002, 97999)
print(d[0], set(d[1:5001]), d[5001], set(h.pread(4096, 8384512)), h.pread(8, 1048576 - 4).hex())
""")
    assert out.split() == ["0", "{195}", "0", "{17}", "000000005a5a5a5a"]


# The same writes, zeroes and trims, on pynbd and on nbdkit's memory plugin.
OPERATIONS = ("write -P 1 0 64k", "write -P 2 1M 100k", "write -z 0 32k", "discard 1M 32k",
              "write -P 3 5M 4k", "write -z 5M 4k", "write -P 4 6M 40k", "write -z -u 6M 8k",
              "discard 7M 1M")


@pytest.mark.parametrize("allocator", ("sparse", "zstd"))
def test_extents_match_nbdkit(allocator):
    """sparse: the same map. zstd: nbdkit keeps a zeroed page as "zero" where
    pynbd frees it ("hole,zero"), so there only what reads as zeroes must agree."""
    maps = []
    for server in ("pynbd", "nbdkit"):
        with served("memory", "8M", f"allocator={allocator}", server=server) as srv:
            qemu_io(srv.uri, *OPERATIONS)
            maps.append(extent_map(srv.uri))
    if allocator == "sparse":
        assert maps[0] == maps[1]
    assert zero_runs(maps[0]) == zero_runs(maps[1])
    # zeroed, zeroed again after a write, trimmed: holes; written: data
    assert [kind_at(maps[0], o) for o in (0, 5 << 20, 7 << 20, 32 << 10, 6 << 20)] == [3, 3, 3, 0, 0]


def test_unwritten_disk_is_one_hole():
    with served("memory", "1G") as srv:
        assert extent_map(srv.uri) == [(0, 1 << 30, 3)]


@pytest.mark.parametrize("args, word", [(("size=1Q",), "size"), (("1M", "allocator=foo"), "allocator"),
                                        (("1M", "colour=red"), "colour"),
                                        (("256T", "allocator=malloc"), "128 TiB")])
def test_bad_parameters_are_one_line(args, word):
    line = config_error("memory", *args)
    assert "memory" in line and word in line


@pytest.mark.parametrize("allocator", ("sparse", "zstd"))
def test_reads_of_different_pages_run_in_parallel(allocator):
    with served("--filter=delay", "memory", "1M", f"allocator={allocator}", "rdelay=1") as srv:
        out = nbd_script("""
h = nbd.NBD()
h.connect_uri(sys.argv[1])
bufs = [nbd.Buffer(4096), nbd.Buffer(4096)]
start = time.monotonic()
pending = {h.aio_pread(bufs[0], 0), h.aio_pread(bufs[1], 512 * 1024)}
while pending:
    h.poll(-1)
    pending = {c for c in pending if not h.aio_command_completed(c)}
print(time.monotonic() - start)
""", srv.uri)
    assert float(out) < 1.8


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_requests_go_straight_to_the_shared_allocator(allocator):
    """One disk for every client, its request methods the allocator's own (no frame in between)."""
    from pynbd.backend.stack import Stack

    stack = Stack.from_args("memory", ["1M", f"allocator={allocator}"])
    disk = stack.plugin.open(None)
    assert stack.plugin.open(None) is disk and disk.can_multi_conn()
    alloc = disk.allocator
    assert alloc.name == allocator
    for method, own in (("pread", alloc.read), ("pread_buffers", alloc.read_buffers),
                        ("pwrite", alloc.write), ("zero", alloc.zero), ("trim", alloc.trim),
                        ("extents", alloc.extents)):
        assert getattr(disk, method) == own
    assert disk.can_write() and disk.can_trim() and disk.can_zero() and disk.can_extents()


@pytest.mark.parametrize("allocator", ALLOCATORS)
def test_a_trim_on_one_connection_keeps_another_connections_write(allocator):
    """Connection 1 writes the end of a page; connection 2 then zeroes its start."""
    with served("memory", "1M", f"allocator={allocator}") as srv:
        out = nbd_script("""
a, b = nbd.NBD(), nbd.NBD()
a.connect_uri(sys.argv[1]); b.connect_uri(sys.argv[1])
print(a.can_multi_conn())
b.pwrite(b"x" * 4096, 0)
a.pwrite(b"y" * 4096, 8192)
b.zero(4096, 0)
b.trim(4096, 4096)
print(a.pread(4096, 8192) == b"y" * 4096, b.pread(8192, 0) == bytes(8192))
""", srv.uri)
    assert out.split() == ["True", "True", "True"]
