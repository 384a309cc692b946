"""tar archive headers (ustar, GNU, pax), read through a callable.

    from pynbd.formats.tar import find_entry, iter_entries

    def read(offset: int, count: int) -> bytes: ...
    entry = find_entry(read, archive_size, "disk.img")   # TarEntry
    entry.data_offset, entry.size                          # where its bytes are
    for entry in iter_entries(read, archive_size): ...

The module is pure: it reads the 512-byte headers it needs and seeks over
each member's data without reading it, so finding an entry near the end of
a large archive costs one small read per member. (Python's ``tarfile`` could
do the parsing over a file-like adapter, but reports damaged archives only
vaguely and has no way to stop after ``limit`` bytes.)

What is understood
    POSIX ustar headers (the 155-byte prefix joined to the name), GNU tar's
    long names and link names ('L' and 'K' members) and base-256 numbers
    (sizes of 8 GiB and more), pax extended headers ('x' per member, 'g'
    global) with ``path``, ``linkpath`` and ``size``, old v7 headers.
    Header checksums are verified (unsigned and signed sums, as GNU tar).

What is reported rather than hidden
    ``TarEntry.sparse`` for GNU sparse members ('S') and pax sparse formats
    (``GNU.sparse.*``): their stored bytes are not the file's bytes. The
    ``type`` says whether a member is a regular file ('0', '7', or NUL).
    A compressed archive (gzip, xz, zstd, bzip2 magic) is named as such.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

BLOCK = 512
ReadFn = Callable[[int, int], bytes]

REGULAR_TYPES = frozenset({"0", "\0", "7"})
_TYPE_NAMES = {"1": "a hard link", "2": "a symbolic link", "3": "a character device",
               "4": "a block device", "5": "a directory", "6": "a FIFO"}
_COMPRESSED_MAGIC = ((b"\x1f\x8b", "gzip"), (b"\xfd7zXZ\x00", "xz"),
                     (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bzip2"))


class TarError(ValueError):
    """The archive is damaged, or the entry is missing or cannot be served."""


@dataclass(frozen=True)
class TarEntry:
    """One member of the archive."""

    name: str
    type: str  # the typeflag character
    size: int  # bytes of data stored in the archive
    header_offset: int  # where its (first) header starts
    data_offset: int  # where its data starts
    linkname: str = ""
    sparse: bool = False

    @property
    def is_regular(self) -> bool:
        return self.type in REGULAR_TYPES

    def kind(self) -> str:
        """What the member is, in words ('a directory', 'a regular file')."""
        return "a regular file" if self.is_regular else _TYPE_NAMES.get(
            self.type, f"a member of type {self.type!r}")


def _number(field: bytes, what: str, offset: int) -> int:
    """An octal (ASCII) or GNU base-256 number field."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field, "big") & ((1 << (8 * len(field) - 1)) - 1)
        if field[0] & 0x40:  # negative (0xff prefix)
            value -= 1 << (8 * len(field) - 1)
        return value
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise TarError(f"tar: bad {what} field {field!r} in the header at offset {offset}") from None


def _string(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156].split(b"\0", 1)[0].strip(b" ")
    try:
        value = int(stored, 8)
    except ValueError:
        return False
    masked = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(masked)
    signed = unsigned - 256 * sum(1 for b in masked if b & 0x80)
    return value in (unsigned, signed)


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    """Parse 'LEN key=value\\n' records."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos:pos + 1] not in (b"\0", b""):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarError(f"tar: bad pax record in the extended header at offset {offset}") from None
        record = data[space + 1:pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise TarError(f"tar: bad pax record in the extended header at offset {offset}")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _refuse_compressed(first: bytes) -> None:
    for magic, name in _COMPRESSED_MAGIC:
        if first.startswith(magic):
            raise TarError(f"tar: the archive is {name}-compressed: put --filter={name} "
                           "below --filter=tar (after it on the command line)")


def iter_entries(read: ReadFn, archive_size: int, limit: int = 0) -> Iterator[TarEntry]:
    """Every member in order. ``limit`` > 0: stop at the first header at or past that offset."""
    pos = 0
    pending: dict[str, str] = {}  # from 'x', 'L', 'K' members: applies to the next header
    global_records: dict[str, str] = {}
    first_header = pos
    _refuse_compressed(read(0, min(BLOCK, archive_size)))
    while True:
        if limit and pos >= limit:
            return
        if pos + BLOCK > archive_size:
            if pos == archive_size and pos:
                return  # no end-of-archive blocks, as some writers leave it
            raise TarError(f"tar: the archive is truncated: header at offset {pos} runs past "
                           f"its end ({archive_size} bytes)")
        header = read(pos, BLOCK)
        if header == bytes(BLOCK):
            return  # end of archive
        if not _checksum_ok(header):
            if pos == 0:
                raise TarError("tar: not a tar archive (bad header checksum at offset 0)")
            raise TarError(f"tar: bad header checksum at offset {pos}: corrupt archive")
        typeflag = chr(header[156]) if header[156] else "\0"
        size = _number(header[124:136], "size", pos)
        if size < 0:
            raise TarError(f"tar: negative size in the header at offset {pos}")
        data_offset = pos + BLOCK
        next_pos = data_offset + -(-size // BLOCK) * BLOCK
        if typeflag in ("x", "g", "L", "K"):
            if data_offset + size > archive_size:
                raise TarError(f"tar: the archive is truncated inside the extended header "
                               f"at offset {pos}")
            data = read(data_offset, size)
            if typeflag == "x":
                pending.update(_pax_records(data, pos))
            elif typeflag == "g":
                global_records.update(_pax_records(data, pos))
            elif typeflag == "L":
                pending["path"] = _string(data)
            else:
                pending["linkpath"] = _string(data)
            pos = next_pos
            continue
        records = {**global_records, **pending}
        pending = {}
        name = _string(header[0:100])
        if header[257:263] == b"ustar\x00" and header[345]:
            name = _string(header[345:500]) + "/" + name
        name = records.get("GNU.sparse.name") or records.get("path", name)  # pax sparse 1.0
        if "size" in records:
            try:
                size = int(records["size"])
            except ValueError:
                raise TarError(f"tar: bad pax size {records['size']!r} at offset {pos}") from None
            next_pos = data_offset + -(-size // BLOCK) * BLOCK
        sparse = typeflag == "S" or any(key.startswith("GNU.sparse.") for key in records)
        if typeflag in REGULAR_TYPES and not sparse and name.endswith("/"):
            typeflag = "5"  # old tars mark directories by the trailing slash only
        yield TarEntry(name, typeflag, size if typeflag in REGULAR_TYPES or typeflag == "S" else 0,
                       first_header, data_offset,
                       records.get("linkpath", _string(header[157:257])), sparse)
        pos = first_header = next_pos


def find_entry(read: ReadFn, archive_size: int, name: str, limit: int = 0) -> TarEntry:
    """The first member called ``name`` (exactly as ``tar tf`` prints it), checked servable."""
    for entry in iter_entries(read, archive_size, limit):
        if entry.name != name:
            continue
        if entry.sparse:
            raise TarError(f"tar: {name!r} is a sparse file: its bytes are not stored "
                           "contiguously in the archive")
        if not entry.is_regular:
            raise TarError(f"tar: {name!r} is {entry.kind()}, not a regular file")
        if entry.data_offset + entry.size > archive_size:
            raise TarError(f"tar: {name!r} runs past the end of the archive "
                           f"({entry.data_offset}+{entry.size} > {archive_size}): truncated")
        return entry
    where = f"the first {limit} bytes of the archive (tar-limit)" if limit else "the archive"
    raise TarError(f"tar: {name!r} not found in {where}")
