"""A RAM disk in nbdkit's API_VERSION 1 convention (no API_VERSION line).

pread(h, count, offset) returns the bytes; pwrite(h, buf, offset),
flush(h), trim(h, count, offset) and zero(h, count, offset, may_trim) take
no flags. Parameter: size=SIZE (default 1M).
"""

import nbdkit

disk = bytearray(1024 * 1024)


def config(key, value):
    if key != "size":
        raise RuntimeError(f"unknown parameter {key}")
    disk[:] = bytes(nbdkit.parse_size(value))


def open(readonly):
    return 1


def get_size(h):
    return len(disk)


def pread(h, count, offset):
    return disk[offset:offset + count]


def pwrite(h, buf, offset):
    disk[offset:offset + len(buf)] = buf


def flush(h):
    pass


def trim(h, count, offset):
    disk[offset:offset + count] = bytes(count)


def zero(h, count, offset, may_trim):
    disk[offset:offset + count] = bytes(count)
