"""qcow2 images (qemu's format, docs/interop/qcow2.txt), written and read through callables.

Writing::

    from pynbd.formats.qcow2 import write_image

    def write(offset: int, data: bytes | memoryview) -> None: ...
    clusters = [(0, b"x" * 65536), (131072, None)]   # (guest offset, data | None), increasing
    length = write_image(write, size=1 << 30, clusters=clusters,
                         cluster_size=65536, version=3,
                         backing_file="base.raw", backing_format="raw")

``write_image`` writes a complete qcow2 image of virtual size ``size`` and
returns the length of the file it wrote. ``clusters`` is an iterable of
``(guest_offset, data)`` in strictly increasing guest order; each offset is a
multiple of the cluster size and ``data`` is the cluster's bytes (a short
last piece is padded with zeroes) or ``None`` for a cluster that reads as
zeroes. A guest cluster that is not listed is unallocated: it reads from the
backing file if there is one, else as zeroes. Data is written as it comes
(each L2 table as soon as the guest offsets move past it), so memory stays
bounded whatever the image size; the header is written last.

Version 3 (default) marks zero clusters with the L2 zero flag. Version 2 has
no such flag: a zero cluster is left unallocated without a backing file and
written out as a cluster of zeroes with one. Every cluster of the file is
used exactly once, so refcounts are 1 throughout (16-bit refcounts) and
``qemu-img check`` finds no errors and no leaks. Layout: header cluster, L1
table, then data clusters and L2 tables interleaved, then the refcount table
and refcount blocks.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable

MAGIC = b"QFI\xfb"
DEFAULT_CLUSTER_SIZE = 1 << 16
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

# Header extension types
EXT_END = 0
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_NAMES = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# Table entry bits
COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO_FLAG = 1
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00

HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")  # 72 bytes
HEADER_V3_TAIL = struct.Struct(">QQQII")  # incompatible..header_length, bytes 72-103
V3_HEADER_LENGTH = 112  # with the compression_type byte and its padding
REFCOUNT_ORDER = 4  # 16-bit refcounts
_EXT = struct.Struct(">II")

WriteFn = Callable[[int, "bytes | bytearray | memoryview"], None]


class Qcow2Error(ValueError):
    """The image is not qcow2, is damaged, or uses something not supported."""


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pad8(data: bytes) -> bytes:
    return data + bytes(-len(data) % 8)


def cluster_bits_of(cluster_size: int) -> int:
    """log2 of a valid cluster size (a power of 2 from 512 bytes to 2 MiB)."""
    bits = cluster_size.bit_length() - 1
    if cluster_size != 1 << bits or not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
        raise Qcow2Error(f"qcow2: cluster size {cluster_size} must be a power of 2 from 512 to 2M")
    return bits


def _header_cluster(*, version: int, cluster_bits: int, size: int, l1_size: int,
                    l1_offset: int, refcount_offset: int, refcount_clusters: int,
                    backing_file: str | None, backing_format: str | None) -> bytes:
    """Cluster 0: header, header extensions and the backing file name."""
    cluster_size = 1 << cluster_bits
    extensions = b""
    if backing_format is not None:
        fmt = backing_format.encode()
        extensions += _EXT.pack(EXT_BACKING_FORMAT, len(fmt)) + _pad8(fmt)
    extensions += _EXT.pack(EXT_END, 0)
    header_length = 72 if version == 2 else V3_HEADER_LENGTH
    name = backing_file.encode() if backing_file is not None else b""
    if len(name) > 1023:
        raise Qcow2Error("qcow2: backing file name longer than 1023 bytes")
    name_offset = header_length + len(extensions) if name else 0
    if header_length + len(extensions) + len(name) > cluster_size:
        raise Qcow2Error("qcow2: header, extensions and backing file name exceed one cluster")
    header = HEADER_V2.pack(MAGIC, version, name_offset, len(name), cluster_bits, size, 0,
                            l1_size, l1_offset, refcount_offset, refcount_clusters, 0, 0)
    if version == 3:
        header += HEADER_V3_TAIL.pack(0, 0, 0, REFCOUNT_ORDER, header_length)
        header += bytes(header_length - len(header))  # compression_type 0 (zlib), padding
    return (header + extensions + name).ljust(cluster_size, b"\0")


def write_image(write: WriteFn, size: int,
                clusters: Iterable[tuple[int, bytes | bytearray | memoryview | None]], *,
                cluster_size: int = DEFAULT_CLUSTER_SIZE, version: int = 3,
                backing_file: str | None = None, backing_format: str | None = None) -> int:
    """Write a qcow2 image through ``write(offset, data)``; return the file's length."""
    bits = cluster_bits_of(cluster_size)
    if version not in (2, 3):
        raise Qcow2Error(f"qcow2: version {version}: only 2 and 3 exist")
    if size < 0:
        raise Qcow2Error("qcow2: negative virtual size")
    if backing_format is not None and backing_file is None:
        raise Qcow2Error("qcow2: a backing format needs a backing file")
    l2_entries = cluster_size // 8
    l1_size = _ceil_div(_ceil_div(size, cluster_size), l2_entries)
    l1_clusters = _ceil_div(l1_size * 8, cluster_size)
    l1 = bytearray(l1_clusters * cluster_size)
    next_free = 1 + l1_clusters  # in clusters: the header and the L1 table come first
    zero_cluster = bytes(cluster_size) if version == 2 and backing_file is not None else None

    l2 = bytearray(cluster_size)
    l2_index = -1  # the L1 index whose L2 table is in ``l2``; -1: none yet
    previous = -1

    def flush_l2() -> None:
        nonlocal next_free
        if l2_index >= 0:
            write(next_free << bits, l2)
            struct.pack_into(">Q", l1, l2_index * 8, (next_free << bits) | COPIED)
            next_free += 1

    for guest, data in clusters:
        if guest % cluster_size:
            raise Qcow2Error(f"qcow2: guest offset {guest} is unaligned to the cluster size")
        if guest <= previous:
            raise Qcow2Error(f"qcow2: guest offset {guest} is out of order (after {previous})")
        if guest >= size:
            raise Qcow2Error(f"qcow2: guest offset {guest} is past the end of the disk ({size})")
        previous = guest
        if data is None:
            if version == 2:
                if zero_cluster is None:
                    continue  # unallocated reads as zeroes when there is no backing file
                data = zero_cluster
        elif len(data) > cluster_size:
            raise Qcow2Error(f"qcow2: {len(data)} bytes of data for a {cluster_size}-byte cluster")
        index, slot = divmod(guest >> bits, l2_entries)
        if index != l2_index:
            flush_l2()
            l2 = bytearray(cluster_size)
            l2_index = index
        if data is None:
            entry = ZERO_FLAG
        else:
            write(next_free << bits, data)
            if len(data) < cluster_size:
                write((next_free << bits) + len(data), bytes(cluster_size - len(data)))
            entry = (next_free << bits) | COPIED
            next_free += 1
        struct.pack_into(">Q", l2, slot * 8, entry)
    flush_l2()

    # Refcount structures cover every cluster, themselves included: find the fixed point.
    per_block = cluster_size * 8 >> REFCOUNT_ORDER
    table_clusters, blocks = 1, 1
    while True:
        total = next_free + table_clusters + blocks
        need_blocks = _ceil_div(total, per_block)
        need_table = _ceil_div(need_blocks * 8, cluster_size)
        if need_blocks <= blocks and need_table <= table_clusters:
            break
        blocks, table_clusters = max(blocks, need_blocks), max(table_clusters, need_table)
    table_offset = next_free << bits
    first_block = next_free + table_clusters
    table = bytearray(table_clusters * cluster_size)
    for i in range(blocks):
        struct.pack_into(">Q", table, i * 8, (first_block + i) << bits)
    write(table_offset, table)
    one = (1).to_bytes(2, "big")
    for i in range(blocks):
        used = min(per_block, total - i * per_block)
        write((first_block + i) << bits, (one * used).ljust(cluster_size, b"\0"))

    write(cluster_size, l1)
    write(0, _header_cluster(version=version, cluster_bits=bits, size=size, l1_size=l1_size,
                             l1_offset=cluster_size, refcount_offset=table_offset,
                             refcount_clusters=table_clusters, backing_file=backing_file,
                             backing_format=backing_format))
    return total << bits
