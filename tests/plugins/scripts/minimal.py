"""The least an nbdkit Python plugin can be: open, get_size and pread.

A read-only 1 MiB disk whose every byte is its offset modulo 251. Nothing
else is defined, so every other behaviour is the servers' default.
"""

API_VERSION = 2
PATTERN = bytes(i % 251 for i in range(251)) * (1024 * 1024 // 251 + 2)


def open(readonly):
    return None


def get_size(h):
    return 1024 * 1024


def pread(h, buf, offset, flags):
    start = offset % 251
    buf[:] = PATTERN[start:start + len(buf)]
