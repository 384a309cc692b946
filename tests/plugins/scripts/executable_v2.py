#!/usr/bin/env -S pynbd serve
"""An nbdkit Python plugin that is also an executable pynbd server.

    ./executable_v2.py -U - size=64k --run 'nbdinfo --size "$uri"'
"""

import nbdkit

API_VERSION = 2
size = 4096


def config(key, value):
    global size
    size = nbdkit.parse_size(value)


def open(readonly):
    return None


def get_size(h):
    return size


def pread(h, buf, offset, flags):
    buf[:] = b"\x07" * len(buf)
