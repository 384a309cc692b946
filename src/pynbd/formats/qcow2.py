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
and refcount blocks. qemu reads virtual sizes rounded down to 512 bytes.

Reading::

    from pynbd.formats.qcow2 import Qcow2Reader, read_header, is_qcow2

    def pread(buf: memoryview, offset: int) -> None: ...   # fill buf from the file
    image = Qcow2Reader(pread, file_size)          # Qcow2Error if refused or damaged
    image.size                                     # the virtual disk size
    image.pread(buf, offset)                       # the guest's bytes
    image.extents(offset, count)                   # (offset, length, hole, zero)...
    image.map(offset, count)                       # (RUN_*, guest, length, host)...

``read_header`` parses the header and its extensions (backing file and
format, feature names, data file) and ``read_snapshots`` the snapshot table;
``unsupported(header, snapshots)`` lists what a reader of the active image
cannot handle. ``Qcow2Reader`` understands versions 2 and 3, cluster sizes
from 512 bytes to 2 MiB, the v3 zero flag and zlib and zstd compressed
clusters; it refuses encryption, external data files, extended L2 entries,
internal snapshots (listing them), unknown incompatible features, and a
backing file unless ``open_backing`` is given. L1 entries are checked
against the file size when the image is opened and each L2 table when it is
first loaded, so a damaged table is a Qcow2Error, never a read of the wrong
bytes.
"""

from __future__ import annotations

import struct
import sys
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from ..backend.blocks import fill_zero

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


# ---------------------------------------------------------------- reading

ReadIntoFn = Callable[[memoryview, int], None]
"""``pread(buf, offset)``: fill ``buf`` with the file's bytes at ``offset``."""

# Incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTENDED_L2 = 1 << 4
_KNOWN_INCOMPAT = (INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION
                   | INCOMPAT_EXTENDED_L2)
_FEATURE_NAME = struct.Struct(">BB46s")
_SNAPSHOT = struct.Struct(">QIHHIIQII")
COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}
MAX_L1_BYTES = 32 << 20  # qemu's limit on the L1 table


@dataclass(frozen=True)
class Header:
    """The fields of a qcow2 header and its extensions."""

    version: int
    cluster_bits: int
    size: int
    crypt_method: int
    l1_size: int
    l1_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible: int = 0
    compatible: int = 0
    autoclear: int = 0
    refcount_order: int = REFCOUNT_ORDER
    header_length: int = 72
    compression_type: int = COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


@dataclass(frozen=True)
class Snapshot:
    """An internal snapshot (from the snapshot table)."""

    id: str
    name: str
    l1_offset: int
    l1_size: int
    date: int  # seconds since the epoch


def _read(pread: ReadIntoFn, offset: int, count: int, file_size: int, what: str) -> bytes:
    if offset < 0 or offset + count > file_size:
        raise Qcow2Error(f"qcow2: {what} at offset {offset} (+{count}) lies past the end of "
                         f"the file ({file_size} bytes): truncated or corrupt image")
    buf = bytearray(count)
    pread(memoryview(buf), offset)
    return bytes(buf)


def is_qcow2(first_bytes: bytes) -> bool:
    """Whether a file starting with these bytes is qcow2 (the magic)."""
    return first_bytes[:4] == MAGIC


def read_header(pread: ReadIntoFn, file_size: int) -> Header:
    """Parse the header and header extensions (Qcow2Error if they are not valid qcow2)."""
    if file_size < HEADER_V2.size:
        raise Qcow2Error(f"qcow2: file of {file_size} bytes is too short for a qcow2 header")
    raw = _read(pread, 0, min(file_size, 4096), file_size, "header")
    (magic, version, backing_offset, backing_size, bits, size, crypt, l1_size, l1_offset,
     rc_offset, rc_clusters, nb_snapshots, snapshots_offset) = HEADER_V2.unpack_from(raw)
    if magic != MAGIC:
        raise Qcow2Error(f"qcow2: bad magic {magic!r}: not a qcow2 image")
    if version not in (2, 3):
        raise Qcow2Error(f"qcow2: version {version} is not supported (only 2 and 3)")
    if not MIN_CLUSTER_BITS <= bits <= MAX_CLUSTER_BITS:
        raise Qcow2Error(f"qcow2: cluster_bits {bits} is out of range (9-21)")
    incompatible = compatible = autoclear = 0
    order, header_length, compression = REFCOUNT_ORDER, 72, COMPRESSION_ZLIB
    if version == 3:
        if len(raw) < 104:
            raise Qcow2Error("qcow2: truncated version 3 header")
        incompatible, compatible, autoclear, order, header_length = \
            HEADER_V3_TAIL.unpack_from(raw, 72)
        if header_length < 104 or header_length % 8 or header_length > len(raw):
            raise Qcow2Error(f"qcow2: bad header_length {header_length}")
        if header_length > 104:
            compression = raw[104]
    cluster_size = 1 << bits
    backing_format = data_file = None
    names: dict[tuple[int, int], str] = {}
    area = _read(pread, 0, min(file_size, cluster_size), file_size, "header extensions")
    pos = header_length
    while pos + 8 <= len(area):
        kind, length = _EXT.unpack_from(area, pos)
        pos += 8
        if kind == EXT_END:
            break
        data = area[pos:pos + length]
        if len(data) < length:
            raise Qcow2Error("qcow2: header extension runs past the first cluster")
        if kind == EXT_BACKING_FORMAT:
            backing_format = data.decode(errors="replace")
        elif kind == EXT_DATA_FILE:
            data_file = data.decode(errors="replace")
        elif kind == EXT_FEATURE_NAMES:
            for i in range(0, length - _FEATURE_NAME.size + 1, _FEATURE_NAME.size):
                ftype, bit, name = _FEATURE_NAME.unpack_from(data, i)
                names[(ftype, bit)] = name.rstrip(b"\0").decode(errors="replace")
        pos += length + (-length % 8)
    backing = None
    if backing_offset:
        if backing_size > 1023:
            raise Qcow2Error(f"qcow2: backing file name of {backing_size} bytes (limit 1023)")
        backing = _read(pread, backing_offset, backing_size, file_size,
                        "backing file name").decode(errors="replace")
    return Header(version, bits, size, crypt, l1_size, l1_offset, rc_offset, rc_clusters,
                  nb_snapshots, snapshots_offset, incompatible, compatible, autoclear, order,
                  header_length, compression, backing, backing_format, data_file, names)


def read_snapshots(pread: ReadIntoFn, header: Header, file_size: int) -> list[Snapshot]:
    """The internal snapshots listed in the snapshot table."""
    snapshots = []
    pos = header.snapshots_offset
    for _ in range(header.nb_snapshots):
        fixed = _read(pread, pos, _SNAPSHOT.size, file_size, "snapshot table")
        l1_offset, l1_size, id_size, name_size, date, _nsec, _clock, _vm, extra = \
            _SNAPSHOT.unpack(fixed)
        strings_at = pos + _SNAPSHOT.size + extra
        text = _read(pread, strings_at, id_size + name_size, file_size, "snapshot table")
        snapshots.append(Snapshot(text[:id_size].decode(errors="replace"),
                                  text[id_size:].decode(errors="replace"), l1_offset, l1_size,
                                  date))
        end = strings_at + id_size + name_size
        pos = end + (-end % 8)
    return snapshots


def describe(first_bytes: bytes, file_size: int) -> str | None:
    """One line about a qcow2 image from its first bytes (``pynbd info``), None if not qcow2."""
    if not is_qcow2(first_bytes):
        return None

    def pread(buf: memoryview, offset: int) -> None:
        piece = first_bytes[offset:offset + len(buf)]
        buf[:len(piece)] = piece
        fill_zero(buf[len(piece):])

    try:
        header = read_header(pread, file_size)
    except Qcow2Error as exc:
        return f"QEMU QCOW2 image, damaged ({exc})"
    words = [f"QEMU QCOW2 image (v{header.version}), virtual size {header.size} bytes",
             f"cluster size {header.cluster_size}"]
    if header.compression_type != COMPRESSION_ZLIB:
        words.append(f"{COMPRESSION_NAMES.get(header.compression_type, '?')} compression")
    if header.crypt_method:
        words.append("encrypted")
    if header.backing_file is not None:
        fmt = f" ({header.backing_format})" if header.backing_format else ""
        words.append(f"backing file {header.backing_file!r}{fmt}")
    if header.nb_snapshots:
        words.append(f"{header.nb_snapshots} internal snapshot(s)")
    return ", ".join(words)


def unsupported(header: Header, snapshots: Sequence[Snapshot] = ()) -> list[str]:
    """Why a reader of the active image (without a backing file) cannot serve it; [] if it can."""
    reasons = []
    unknown = header.incompatible & ~_KNOWN_INCOMPAT
    if unknown:
        bits = [b for b in range(64) if unknown >> b & 1]
        named = ", ".join(header.feature_names.get((0, b), f"bit {b}") for b in bits)
        reasons.append(f"unknown incompatible features: {named}")
    if header.crypt_method:
        method = {1: "AES", 2: "LUKS"}.get(header.crypt_method, str(header.crypt_method))
        reasons.append(f"the image is encrypted ({method})")
    if header.incompatible & INCOMPAT_DATA_FILE:
        name = f" {header.data_file!r}" if header.data_file else ""
        reasons.append(f"the image keeps its data in an external data file{name}")
    if header.incompatible & INCOMPAT_EXTENDED_L2:
        reasons.append("extended L2 entries (subclusters) are not supported")
    if header.compression_type not in COMPRESSION_NAMES:
        reasons.append(f"unknown compression type {header.compression_type}")
    if header.refcount_order > 6:
        reasons.append(f"refcount_order {header.refcount_order} is out of range")
    if snapshots:
        listed = ", ".join(f"{s.id} {s.name!r}" for s in snapshots)
        reasons.append(f"the image has internal snapshots ({listed})")
    return reasons


# Kinds of guest ranges (Qcow2Reader.map)
RUN_DATA = 0  # stored in the file at ``host``
RUN_ZERO = 1  # reads as zeroes (the v3 zero flag)
RUN_UNALLOCATED = 2  # not in this image: the backing file's bytes, or zeroes
RUN_COMPRESSED = 3  # one compressed cluster; ``host`` is its L2 descriptor

_BIG_ENDIAN_HOST = sys.byteorder == "big"


class LRU:
    """A small thread-safe least-recently-used map (the reader's table and cluster caches)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self.items: OrderedDict[int, array[int] | bytes] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: int) -> array[int] | bytes | None:
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key: int, value: array[int] | bytes) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.capacity:
                self.items.popitem(last=False)


class Qcow2Reader:
    """Read the active image of a qcow2 file through ``pread(buf, offset)``.

    ``open_backing(name, format)``, if given, is called when the image has a
    backing file (``format`` is None when the header does not say) and
    returns ``backing(buf, guest_offset)``, which fills the ranges the image
    does not allocate (zeroes past the backing file's end); it raises
    Qcow2Error to refuse. Without it an image with a backing file is refused.
    Methods are thread-safe: L2 tables and decompressed clusters sit in LRU
    caches of ``l2_cache`` and ``cluster_cache`` entries.
    """

    def __init__(self, pread: ReadIntoFn, file_size: int, *,
                 open_backing: Callable[[str, str | None], ReadIntoFn] | None = None,
                 l2_cache: int = 256, cluster_cache: int = 64) -> None:
        self.file_pread = pread
        self.file_size = file_size
        self.header = header = read_header(pread, file_size)
        self.snapshots = read_snapshots(pread, header, file_size)
        reasons = unsupported(header, self.snapshots)
        if header.backing_file is not None and open_backing is None:
            fmt = f" (format {header.backing_format})" if header.backing_format else ""
            reasons.append(f"the image has a backing file {header.backing_file!r}{fmt}, "
                           "which is not followed")
        if reasons:
            raise Qcow2Error("qcow2: " + "; ".join(reasons))
        self.backing: ReadIntoFn | None = None
        if header.backing_file is not None and open_backing is not None:
            self.backing = open_backing(header.backing_file, header.backing_format)
        self.size = header.size
        self.bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.l2_entries = self.cluster_size // 8
        self.zero_flag = ZERO_FLAG if header.version >= 3 else 0
        compressed_bits = 62 - (self.bits - 8)
        self.compressed_offset_mask = (1 << compressed_bits) - 1
        self.compressed_shift = compressed_bits
        self.compressed_sectors_mask = (1 << (62 - compressed_bits)) - 1
        self.zstd = header.compression_type == COMPRESSION_ZSTD
        need = -(-header.size // self.cluster_size)
        if header.l1_size < -(-need // self.l2_entries):
            raise Qcow2Error(f"qcow2: L1 table of {header.l1_size} entries is too small for a "
                             f"{header.size}-byte disk: corrupt image")
        if header.l1_size * 8 > MAX_L1_BYTES:
            raise Qcow2Error(f"qcow2: L1 table of {header.l1_size} entries is too large")
        if header.l1_offset % self.cluster_size:
            raise Qcow2Error(f"qcow2: L1 table offset {header.l1_offset} is not cluster-aligned")
        self.l1 = self._table(_read(pread, header.l1_offset, header.l1_size * 8, file_size,
                                    "L1 table"))
        for index, entry in enumerate(self.l1):
            l2 = entry & OFFSET_MASK
            if l2 and (l2 % self.cluster_size or l2 + self.cluster_size > file_size):
                raise Qcow2Error(f"qcow2: L1 entry {index} points to an L2 table at offset "
                                 f"{l2}, {self._where(l2)}: corrupt image")
        self.l2_cache = LRU(l2_cache)
        self.cluster_cache = LRU(cluster_cache)

    def _where(self, offset: int) -> str:
        if offset >= self.file_size:
            return f"past the end of the file ({self.file_size} bytes)"
        return "not aligned to a cluster"

    @staticmethod
    def _table(data: bytes) -> array[int]:
        table = array("Q")
        table.frombytes(data)
        if not _BIG_ENDIAN_HOST:
            table.byteswap()
        return table

    def _l2(self, offset: int) -> array[int]:
        table = self.l2_cache.get(offset)
        if isinstance(table, array):
            return table
        buf = bytearray(self.cluster_size)
        self.file_pread(memoryview(buf), offset)
        table = self._table(bytes(buf))
        file_size = self.file_size
        for index, entry in enumerate(table):
            host = (entry & self.compressed_offset_mask if entry & COMPRESSED
                    else entry & OFFSET_MASK)
            if host >= file_size or (host % self.cluster_size and not entry & COMPRESSED):
                raise Qcow2Error(f"qcow2: L2 table at offset {offset}, entry {index} points "
                                 f"to offset {host}, {self._where(host)}: corrupt image")
        self.l2_cache.put(offset, table)
        return table

    def entry(self, cluster: int) -> int:
        """The L2 entry of guest cluster number ``cluster`` (0 if it has no L2 table)."""
        index, slot = divmod(cluster, self.l2_entries)
        l2 = self.l1[index] & OFFSET_MASK
        return self._l2(l2)[slot] if l2 else 0

    def map(self, offset: int, count: int) -> Iterator[tuple[int, int, int, int]]:
        """(kind, guest offset, length, host) for the ranges of [offset, offset+count).

        Neighbouring ranges of one kind are merged (RUN_DATA only where the host
        offsets are contiguous too); RUN_COMPRESSED ranges are one cluster each.
        """
        bits, mask = self.bits, self.cluster_size - 1
        end = min(offset + count, self.size)
        pos = offset
        run_kind, run_start, run_host, run_end = -1, offset, 0, offset
        while pos < end:
            take = min(mask + 1 - (pos & mask), end - pos)
            entry = self.entry(pos >> bits)
            host = 0
            if entry & COMPRESSED:
                kind, host = RUN_COMPRESSED, entry & ~(COPIED | COMPRESSED)
            elif entry & self.zero_flag:
                kind = RUN_ZERO
            elif entry & OFFSET_MASK:
                kind, host = RUN_DATA, (entry & OFFSET_MASK) + (pos & mask)
            else:
                kind = RUN_UNALLOCATED
            if kind == run_kind and kind != RUN_COMPRESSED and (
                    kind != RUN_DATA or host == run_host + run_end - run_start):
                run_end += take
            else:
                if run_kind >= 0:
                    yield run_kind, run_start, run_end - run_start, run_host
                run_kind, run_start, run_host, run_end = kind, pos, host, pos + take
            pos += take
        if run_kind >= 0:
            yield run_kind, run_start, run_end - run_start, run_host

    def decompressed(self, descriptor: int, need: int) -> bytes:
        """The first ``need`` bytes at least of the cluster a compressed descriptor names.

        zlib clusters are inflated only as far as ``need`` (a 4 KiB read
        inflates half a cluster on average); a whole cluster is cached.
        """
        cached = self.cluster_cache.get(descriptor)
        if isinstance(cached, bytes) and len(cached) >= need:
            return cached
        host = descriptor & self.compressed_offset_mask
        sectors = (descriptor >> self.compressed_shift) & self.compressed_sectors_mask
        length = min((sectors + 1) * 512 - (host & 511), self.file_size - host)
        raw = _read(self.file_pread, host, length, self.file_size, "compressed cluster")
        size = self.cluster_size
        if self.zstd:
            data = _unzstd(raw, size, host)
        else:
            try:
                data = zlib.decompressobj(-15).decompress(raw, need)
            except zlib.error as exc:
                raise _corrupt(host, exc) from None
        if len(data) < need or (self.zstd and len(data) != size):
            raise Qcow2Error(f"qcow2: compressed cluster at offset {host} decompressed to "
                             f"{len(data)} bytes, not {size}: corrupt image")
        if len(data) == size:
            self.cluster_cache.put(descriptor, data)
        return data

    def pread(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with the guest's bytes at ``offset`` (zeroes past the virtual size)."""
        mask = self.cluster_size - 1
        filled = 0
        for kind, guest, length, host in self.map(offset, len(buf)):
            view = buf[guest - offset:guest - offset + length]
            if kind == RUN_DATA:
                inside = max(0, min(length, self.file_size - host))
                if inside:
                    self.file_pread(view[:inside], host)
                if inside < length:  # a last cluster cut short by the end of the file
                    fill_zero(view[inside:])
            elif kind == RUN_COMPRESSED:
                inner = guest & mask
                view[:] = self.decompressed(host, inner + length)[inner:inner + length]
            elif kind == RUN_UNALLOCATED and self.backing is not None:
                self.backing(view, guest)
            else:
                fill_zero(view)
            filled = guest - offset + length
        if filled < len(buf):
            fill_zero(buf[filled:])

    def extents(self, offset: int, count: int) -> Iterator[tuple[int, int, bool, bool]]:
        """(offset, length, hole, zero) over [offset, offset+count), as qemu reports them.

        Unallocated and zero clusters are holes that read as zeroes (with a
        backing file, unallocated ranges are data: their bytes come from it);
        stored and compressed clusters are data.
        """
        start, stop, hole = offset, offset, False
        for kind, guest, length, _host in self.map(offset, count):
            is_hole = kind == RUN_ZERO or (kind == RUN_UNALLOCATED and self.backing is None)
            if stop > start and is_hole != hole:
                yield start, stop - start, hole, hole
                start = guest
            stop, hole = guest + length, is_hole
        if stop > start:
            yield start, stop - start, hole, hole


def _corrupt(host: int, exc: Exception) -> Qcow2Error:
    return Qcow2Error(f"qcow2: compressed cluster at offset {host} is corrupt: {exc}")


def _unzstd(raw: bytes, size: int, host: int) -> bytes:
    """One zstd-compressed cluster (zstandard is imported here, when an image first needs it:
    a backup, which only writes, starts without it)."""
    import zstandard

    try:
        data: bytes = zstandard.ZstdDecompressor().decompress(raw, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise _corrupt(host, exc) from None
    return data
