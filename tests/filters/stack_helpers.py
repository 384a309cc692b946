"""Helpers for the filter tests: disk images with partition tables, both servers, logs.

    from stack_helpers import BOTH, make_mbr, make_gpt, log_lines, nbdsh_errno

``make_mbr`` / ``make_gpt`` write partition tables with struct (no fdisk
needed) and stamp each partition with its own recognisable bytes;
``log_lines`` reads a log filter's file without timestamps, so the same
client run against pynbd and nbdkit can be compared line for line.
"""

from __future__ import annotations

import os
import re
import struct
import uuid
from collections.abc import Sequence

from nbdtest import run

BOTH = ("pynbd", "nbdkit")
SECTOR = 512
LINUX_GUID = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")


def _mbr_entry(ptype: int, first: int, count: int) -> bytes:
    return struct.pack("<B3sB3sII", 0, b"\0\0\0", ptype, b"\0\0\0", first, count)


def _boot_record(entries: Sequence[bytes]) -> bytes:
    table = b"".join(entries).ljust(64, b"\0")
    return bytes(446) + table + b"\x55\xaa"


def stamp(f, offset: int, number: int, length: int) -> None:
    """Fill a partition with bytes that say which partition they are."""
    f.seek(offset)
    f.write(bytes([number]) * (length - 1) + bytes([0xFF]))


def make_mbr(path: str, size: int, primaries: Sequence[tuple[int, int, int]],
             logicals: Sequence[tuple[int, int]] = ()) -> None:
    """An MBR disk. primaries: (type, first sector, sectors); a type of 5 makes
    the extended partition, which holds ``logicals`` (sectors, gap before it)."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(_boot_record([_mbr_entry(*p) for p in primaries]))
        for number, (ptype, first, count) in enumerate(primaries, start=1):
            if ptype != 5:
                stamp(f, first * SECTOR, number, count * SECTOR)
        extended = next((p for p in primaries if p[0] == 5), None)
        if extended is None:
            return
        ebr = extended[1]
        for index, (count, gap) in enumerate(logicals):
            is_last = index == len(logicals) - 1
            next_ebr = ebr + gap + count
            link = [] if is_last else [_mbr_entry(5, next_ebr - extended[1], sum(logicals[index + 1]))]
            f.seek(ebr * SECTOR)
            f.write(_boot_record([_mbr_entry(0x83, gap, count), *link]))
            stamp(f, (ebr + gap) * SECTOR, 5 + index, count * SECTOR)
            ebr = next_ebr


def make_gpt(path: str, size: int, partitions: Sequence[tuple[int, int] | None]) -> None:
    """A GPT disk; partitions are (first sector, last sector) or None for an unused entry."""
    entries = bytearray(128 * 128)
    for index, part in enumerate(partitions):
        if part is not None:
            struct.pack_into("<16s16sQQQ72s", entries, index * 128, LINUX_GUID.bytes_le,
                             uuid.uuid4().bytes_le, part[0], part[1], 0,
                             f"part{index + 1}".encode("utf-16-le"))
    last_lba = size // SECTOR - 1
    header = struct.pack("<8s4sII4sQQQQ16sQIII", b"EFI PART", b"\0\0\1\0", 92, 0, bytes(4), 1,
                         last_lba, 34, last_lba - 33, uuid.uuid4().bytes_le, 2, 128, 128, 0)
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(_boot_record([_mbr_entry(0xEE, 1, min(last_lba, 0xFFFFFFFF))]))
        f.write(header.ljust(SECTOR, b"\0"))
        f.write(entries)
        for index, part in enumerate(partitions):
            if part is not None:
                stamp(f, part[0] * SECTOR, index + 1, (part[1] - part[0] + 1) * SECTOR)


_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ ")
_SKIP = ("Preconnect", "...Preconnect", "Ready", "Fork")


def log_lines(path: str) -> list[str]:
    """The log filter's lines without timestamps and server start-up noise."""
    with open(path, encoding="utf-8") as f:
        lines = [_STAMP.sub("", line.rstrip("\n")) for line in f]
    return [line for line in lines if not line.startswith(_SKIP)]


def actions(path: str) -> list[str]:
    """Just 'Action' or '...Action' for each request line of a log."""
    out = []
    for line in log_lines(path):
        words = line.split()
        if words and words[0].startswith("connection="):
            out.append(words[1])
    return out


def nbdsh_outcomes(uri: str, calls: Sequence[str], options: Sequence[str] = ()) -> list[str]:
    """Run libnbd calls in one nbdsh; for each, 'ok' or the errno name it failed with."""
    lines = ["import errno"]
    for call in calls:
        lines += ["try:", f"    {call}", "    print('ok')", "except nbd.Error as e:",
                  "    print(errno.errorcode.get(e.errno, e.errno))"]
    code = "\n".join(lines)
    return run(["nbdsh", *options, "-u", uri, "-c", code]).stdout.decode().split()


def nbdsh_errno(uri: str, call: str) -> str:
    """Run one libnbd call; 'ok' or the errno name it failed with."""
    return nbdsh_outcomes(uri, [call])[0]


def file_bytes(path: str, offset: int = 0, length: int | None = None) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(-1 if length is None else length)


def tmpfile(tmp_path, name: str, data: bytes) -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "wb") as f:
        f.write(data)
    return path
