"""AES over runs of sectors through OpenSSL's EVP interface, one context per thread.

    from pynbd.formats.evp import EvpSectors, load

    if load() is not None:
        sectors = EvpSectors("xts", key)
        sectors.run(view, 512, ivs, encrypt=False)   # ivs: 16 bytes per sector

Disk encryption gives every sector its own IV, so a request of many sectors
needs the cipher restarted at each one. A ``cryptography`` Cipher object
costs about 10 µs to make; an EVP context keeps its key schedule and takes a
new IV in one call (``EVP_CipherInit_ex`` with only the IV), which makes a
512-byte sector about four times cheaper. The calls go to the system's
libcrypto through cffi's ABI mode. The loop over a run's sectors is the
optional C extension ``_sectors`` (built at install where a C compiler is
present; it links against nothing and is handed libcrypto's function
addresses), which runs the whole run with the interpreter lock released;
without it the same loop runs here, two cffi calls per sector.
``load()`` returns None where no libcrypto can be loaded; callers then use
``cryptography``.
"""

from __future__ import annotations

import ctypes.util
import functools
import threading
from collections.abc import Callable
from typing import Any

from cffi import FFI

SectorLoop = Callable[[int, int, int, memoryview, int, bytes], None]


def _c_loop() -> SectorLoop | None:
    """The C extension's loop, or None where it was not built (no C compiler at install)."""
    try:
        from ._sectors import run
    except ImportError:
        return None
    return run


C_LOOP = _c_loop()

_CDEF = """
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
EVP_CIPHER_CTX *EVP_CIPHER_CTX_new(void);
void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx);
int EVP_CIPHER_CTX_set_padding(EVP_CIPHER_CTX *ctx, int padding);
const EVP_CIPHER *EVP_aes_128_xts(void);
const EVP_CIPHER *EVP_aes_256_xts(void);
const EVP_CIPHER *EVP_aes_128_cbc(void);
const EVP_CIPHER *EVP_aes_192_cbc(void);
const EVP_CIPHER *EVP_aes_256_cbc(void);
int EVP_CipherInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *type, void *impl,
                      const unsigned char *key, const unsigned char *iv, int enc);
int EVP_CipherUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                     const unsigned char *in, int inl);
"""


@functools.cache
def load() -> tuple[FFI, Any] | None:
    """(ffi, libcrypto), or None where libcrypto cannot be loaded."""
    ffi = FFI()
    ffi.cdef(_CDEF)
    for name in ("libcrypto.so.3", ctypes.util.find_library("crypto")):
        if name:
            try:
                return ffi, ffi.dlopen(name)
            except OSError:
                continue
    return None


class EvpSectors:
    """AES-XTS or AES-CBC with one key, restarted with a new IV for every sector."""

    def __init__(self, mode: str, key: bytes, c_loop: bool = True) -> None:
        """``c_loop=False`` runs the loop in Python even where the C extension is built."""
        loaded = load()
        if loaded is None:
            raise OSError("libcrypto cannot be loaded")
        self.ffi, self.lib = loaded
        bits = len(key) * 8 // (2 if mode == "xts" else 1)
        self.cipher = getattr(self.lib, f"EVP_aes_{bits}_{mode}")()
        self.key = key
        self.padding = mode == "cbc"
        self.local = threading.local()
        self.c_loop = C_LOOP if c_loop else None
        address = self._address
        self.addresses = (address(self.lib.EVP_CipherInit_ex), address(self.lib.EVP_CipherUpdate))

    def _address(self, pointer: Any) -> int:
        return int(self.ffi.cast("uintptr_t", pointer))

    def _context(self, encrypt: bool) -> tuple[Any, Any, int]:
        """This thread's context for one direction (keyed once), its output-length cell
        and its address."""
        contexts: dict[bool, tuple[Any, Any, int]] | None = getattr(self.local, "contexts", None)
        if contexts is None:
            contexts = self.local.contexts = {}
        found = contexts.get(encrypt)
        if found is None:
            ffi, lib = self.ffi, self.lib
            ctx = ffi.gc(lib.EVP_CIPHER_CTX_new(), lib.EVP_CIPHER_CTX_free)
            if ctx == ffi.NULL or lib.EVP_CipherInit_ex(
                    ctx, self.cipher, ffi.NULL, self.key, ffi.NULL, int(encrypt)) != 1:
                raise OSError("libcrypto refused the AES key")
            if self.padding:
                lib.EVP_CIPHER_CTX_set_padding(ctx, 0)
            found = contexts[encrypt] = (ctx, ffi.new("int *"), self._address(ctx))
        return found

    def run(self, buf: memoryview, size: int, ivs: bytes, encrypt: bool) -> None:
        """Encrypt or decrypt ``buf`` in place, ``size`` bytes at a time, each with its IV.

        The loop is the hot path of the luks filter: two libcrypto calls per
        sector and nothing else, in C where ``_sectors`` is built. (In the
        Python loop EVP_CipherUpdate cannot fail for a whole number of
        blocks on a keyed context, so its result is not tested.)
        """
        ctx, done, address = self._context(encrypt)
        if self.c_loop is not None:
            self.c_loop(*self.addresses, address, buf, size, ivs)
            return
        ffi, lib = self.ffi, self.lib
        init, update, null = lib.EVP_CipherInit_ex, lib.EVP_CipherUpdate, ffi.NULL
        data = ffi.from_buffer(buf, require_writable=True)
        iv = ffi.from_buffer(ivs)
        for pos in range(0, len(buf), size):
            init(ctx, null, null, null, iv, -1)
            sector = data + pos
            update(ctx, sector, done, sector, size)
            iv += 16
