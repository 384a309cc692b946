"""A RAM disk written for nbdkit's Python plugin, API_VERSION 2, using every callback.

    nbdkit python ramdisk_v2.py size=1M        pynbd serve ./ramdisk_v2.py size=1M

Parameters: size=SIZE (default 1M), log=FILE (callback names are appended),
exports=NAME,NAME (names offered by list_exports; default_export is the first).
Allocation is tracked per 64 KiB block, so extents() reports holes.
"""

import builtins
import errno

import nbdkit

API_VERSION = 2
BLOCK = 65536

disk = bytearray()
written = set()
settings = {"size": 1024 * 1024, "log": None, "exports": ["", "second"]}


def note(what):
    if settings["log"]:
        with builtins.open(settings["log"], "a") as f:  # open() is the plugin's own
            f.write(what + "\n")


def config(key, value):
    if key == "size":
        settings["size"] = nbdkit.parse_size(value)
    elif key == "log":
        settings["log"] = value
    elif key == "exports":
        settings["exports"] = value.split(",")
    else:
        raise RuntimeError(f"unknown parameter {key}")


def config_complete():
    disk.extend(bytes(settings["size"]))
    note("config_complete")


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def get_ready():
    note("get_ready")


def after_fork():
    note("after_fork")


def cleanup():
    note("cleanup")


def preconnect(readonly):
    note(f"preconnect readonly={readonly}")


def list_exports(readonly, is_tls):
    return [(name, f"export {name or 'default'}") if name else name
            for name in settings["exports"]]


def default_export(readonly, is_tls):
    return settings["exports"][0]


def open(readonly):
    note(f"open readonly={readonly} export={nbdkit.export_name()!r}")
    return {"readonly": readonly}


def close(h):
    note("close")


def export_description(h):
    return "a RAM disk"


def get_size(h):
    return len(disk)


def block_size(h):
    return (1, 4096, 1024 * 1024)


def is_rotational(h):
    return False


def can_multi_conn(h):
    return True


def can_write(h):
    return True


def can_flush(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fast_zero(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_cache(h):
    return nbdkit.CACHE_NATIVE


def can_extents(h):
    return True


def _mark(offset, count):
    written.update(range(offset // BLOCK, (offset + count - 1) // BLOCK + 1))


def pread(h, buf, offset, flags):
    buf[:] = disk[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    if offset + len(buf) > len(disk):
        nbdkit.set_error(errno.ENOSPC)
        raise ValueError("write beyond the end")
    disk[offset:offset + len(buf)] = buf
    _mark(offset, len(buf))


def flush(h, flags):
    note("flush")


def trim(h, count, offset, flags):
    disk[offset:offset + count] = bytes(count)


def zero(h, count, offset, flags):
    disk[offset:offset + count] = bytes(count)


def cache(h, count, offset, flags):
    note(f"cache {count} {offset}")


def extents(h, count, offset, flags):
    result = []
    end = offset + count
    block = offset // BLOCK
    while block * BLOCK < end:
        start = block * BLOCK
        kind = 0 if block in written else nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO
        result.append((start, min(BLOCK, len(disk) - start), kind))
        if flags & nbdkit.FLAG_REQ_ONE:
            break
        block += 1
    return result
