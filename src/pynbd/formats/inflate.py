"""Raw deflate decoding that can stop at block boundaries and restart mid-byte.

    from pynbd.formats.inflate import Inflater, DeflateError

    z = Inflater(window=last_32k, bits=3, bit_value=byte >> 5)   # a zran access point
    used, made, end = z.inflate(compressed, out_view, stop_at_block=True)
    z.at_block_boundary, z.bits_pending, z.dictionary()

Random access into a deflate stream (zlib's ``examples/zran.c``) needs three
things Python's ``zlib`` module does not expose: stopping at each deflate
block boundary (``Z_BLOCK``) and learning how many bits of the last byte are
still unused there, resuming at such a bit offset (``inflatePrime``), and
reading back the 32 KiB history (``inflateGetDictionary``). This module
binds those few calls of the system's libz with ctypes — the same library
Python's zlib module uses — and nothing else: the bytes are decoded by zlib
in C, with the GIL released during each call, so readers on several threads
decompress in parallel.

Why not the alternatives: keeping only byte-aligned block boundaries still
needs ``Z_BLOCK`` to find them; the ``indexed_gzip`` package builds its own
index format around one file object with one file position (not shareable by
threads) and is another compiled dependency. Decoding stays in zlib either
way; this is a thin binding.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import ClassVar

Z_OK, Z_STREAM_END, Z_NEED_DICT, Z_BUF_ERROR = 0, 1, 2, -5
Z_NO_FLUSH, Z_BLOCK = 0, 5
WINDOW = 32768


class DeflateError(ValueError):
    """The compressed data is corrupt."""


class _ZStream(ctypes.Structure):
    _fields_ = [
        ("next_in", ctypes.c_void_p), ("avail_in", ctypes.c_uint), ("total_in", ctypes.c_ulong),
        ("next_out", ctypes.c_void_p), ("avail_out", ctypes.c_uint), ("total_out", ctypes.c_ulong),
        ("msg", ctypes.c_char_p), ("state", ctypes.c_void_p),
        ("zalloc", ctypes.c_void_p), ("zfree", ctypes.c_void_p), ("opaque", ctypes.c_void_p),
        ("data_type", ctypes.c_int), ("adler", ctypes.c_ulong), ("reserved", ctypes.c_ulong),
    ]


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("z") or "libz.so.1")
    stream = ctypes.POINTER(_ZStream)
    signatures: dict[str, list[type]] = {
        "inflateInit2_": [stream, ctypes.c_int, ctypes.c_char_p, ctypes.c_int],
        "inflate": [stream, ctypes.c_int],
        "inflateEnd": [stream],
        "inflateReset": [stream],
        "inflatePrime": [stream, ctypes.c_int, ctypes.c_int],
        "inflateSetDictionary": [stream, ctypes.c_char_p, ctypes.c_uint],
        "inflateGetDictionary": [stream, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint)],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = ctypes.c_int
    lib.zlibVersion.restype = ctypes.c_char_p
    return lib


class Inflater:
    """One raw deflate stream (no zlib/gzip wrapper), optionally resumed mid-stream."""

    lib: ClassVar[ctypes.CDLL | None] = None

    def __init__(self, window: bytes = b"", bits: int = 0, bit_value: int = 0) -> None:
        if Inflater.lib is None:
            Inflater.lib = _load()
        self.z = Inflater.lib
        self.stream = _ZStream()
        self.ref = ctypes.byref(self.stream)
        version = self.z.zlibVersion()
        if self.z.inflateInit2_(self.ref, -15, version, ctypes.sizeof(_ZStream)) != Z_OK:
            raise MemoryError("zlib: inflateInit2 failed")
        self.open = True
        if bits:
            self.z.inflatePrime(self.ref, bits, bit_value)
        if window:
            self.z.inflateSetDictionary(self.ref, window, len(window))

    def inflate(self, data: bytes, start: int, out: memoryview, stop_at_block: bool = False
                ) -> tuple[int, int, bool]:
        """Decode ``data[start:]`` into ``out``: (bytes used, bytes made, stream ended)."""
        s = self.stream
        avail = len(data) - start
        base = ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0  # no copy
        s.next_in = base + start if avail else None
        s.avail_in = avail
        target = (ctypes.c_char * len(out)).from_buffer(out) if len(out) else None
        s.next_out = ctypes.addressof(target) if target is not None else None
        s.avail_out = len(out)
        ret = self.z.inflate(self.ref, Z_BLOCK if stop_at_block else Z_NO_FLUSH)
        if ret not in (Z_OK, Z_STREAM_END, Z_BUF_ERROR):
            message = s.msg.decode() if s.msg else f"zlib error {ret}"
            raise DeflateError(f"corrupt deflate data: {message}")
        used = avail - s.avail_in
        made = len(out) - s.avail_out
        s.next_in = s.next_out = None
        del target
        return used, made, ret == Z_STREAM_END

    @property
    def at_block_boundary(self) -> bool:
        """Just after a block (not the last one): a place to keep an access point."""
        return bool(self.stream.data_type & 128) and not self.stream.data_type & 64

    @property
    def bits_pending(self) -> int:
        """Unused bits of the last byte consumed (0-7)."""
        return int(self.stream.data_type & 7)

    def dictionary(self) -> bytes:
        """The last (up to) 32 KiB of output: the window an access point keeps."""
        buf = ctypes.create_string_buffer(WINDOW)
        length = ctypes.c_uint(0)
        self.z.inflateGetDictionary(self.ref, buf, ctypes.byref(length))
        return buf.raw[:length.value]

    def reset(self) -> None:
        """Start a new stream (the next gzip member) with no history."""
        self.z.inflateReset(self.ref)

    def close(self) -> None:
        if self.open:
            self.open = False
            self.z.inflateEnd(self.ref)

    def __del__(self) -> None:
        self.close()
