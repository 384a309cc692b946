"""A 1 MiB disk whose requests fail in chosen ways, for error mapping tests.

Reads from the first 64 KiB succeed (zeroes); from 64 KiB to 128 KiB they
raise after nbdkit.set_error(errno.ENOSPC); above 128 KiB they raise a bare
exception (EIO). Writes are refused with EPERM. zero() asks to be emulated
with pwrite (EOPNOTSUPP), so its refusal is pwrite's.
"""

import errno

import nbdkit

API_VERSION = 2


def open(readonly):
    return None


def get_size(h):
    return 1024 * 1024


def pread(h, buf, offset, flags):
    if offset >= 128 * 1024:
        raise ZeroDivisionError("this region is broken on purpose")
    if offset >= 64 * 1024:
        nbdkit.set_error(errno.ENOSPC)
        raise OSError("out of space on purpose")
    buf[:] = bytes(len(buf))


def pwrite(h, buf, offset, flags):
    nbdkit.set_error(errno.EPERM)
    raise PermissionError("writes are refused")


def zero(h, count, offset, flags):
    nbdkit.set_error(errno.EOPNOTSUPP)
    raise NotImplementedError("emulate me")
