"""luks: read and write a LUKS1 or LUKS2 encrypted disk.

    pynbd serve file disk.img --filter=luks passphrase=+/run/secret
    pynbd serve file disk.img --filter=luks passphrase=-          # asks on the terminal
    LUKS_PASS=secret pynbd serve file disk.img --filter=luks passphrase-env=LUKS_PASS
    pynbd serve file disk.img --filter=luks --filter=partition partition=1 passphrase=+key

The server below sees only encrypted bytes; clients see the decrypted disk
(the LUKS payload: the export is the payload's size). Make images with
``pynbd luks format``, ``cryptsetup luksFormat`` or ``qemu-img create -f luks``.

Parameters (give one of the two)
    passphrase=SECRET     the passphrase; ``+FILE`` reads it from a file,
                          ``-`` from the terminal (or one line of standard
                          input), ``-FD`` from an inherited file descriptor,
                          as nbdkit's password parameters do. A trailing
                          newline is not part of it.
    passphrase-env=VAR    read the passphrase from environment variable VAR

What is understood
    LUKS1 (qemu, cryptsetup ``--type luks1``, nbdkit's luks filter) and
    LUKS2 (cryptsetup's default): any keyslot, PBKDF2 (sha1, sha224,
    sha256, sha384, sha512), argon2i and argon2id keyslots; AES in
    xts-plain64, cbc-plain64, cbc-plain and cbc-essiv:HASH; 512- to
    4096-byte sectors; both LUKS2 header copies (a damaged primary is
    logged and the secondary used). Tokens are ignored.

The header is read and the passphrase tried before the server listens: a
wrong passphrase stops it at start with one line naming the keyslots tried,
and nothing is written. The key is kept for the clients while the header
stays the same; each client's open checks the header again (another program
may have changed it), and where the layer below cannot be opened without a
client the first client's open is where a wrong passphrase is found (that
client is refused with the same line). Unsupported ciphers, hashes, KDFs and keyslot types
are named. The minimum block size is the LUKS sector (as nbdkit's luks
filter says); requests that still do not cover whole sectors (from a filter
above, such as offset) are served by reading, and for writes re-encrypting,
whole sectors around their edges. Zeroing writes encrypted zeroes; trim is
not offered (it would expose ciphertext as garbage) and extents report all
data.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable

from ..backend import (
    FLAG_FUA,
    ConfigError,
    Connection,
    Filter,
    FilterConnection,
    OpenContext,
    Param,
    io_error,
)
from ..backend.params import read_secret
from ..formats.luks import LuksError, SectorCipher, Volume, read_volume, unlock

log = logging.getLogger("pynbd.filters.luks")

# Zeroing writes encrypted zeroes this many bytes at a time.
_ZERO_CHUNK = 1 << 20


class Unlocked:
    """A volume opened with the passphrase: its cipher and where its payload lies."""

    def __init__(self, volume: Volume, keyslot: int, key: bytes) -> None:
        self.volume = volume
        self.keyslot = keyslot
        self.cipher: SectorCipher = volume.data_cipher(key)


def _reader(next: Connection, size: int, seen: list[tuple[int, bytes]]) -> Callable[[int, int], bytes]:
    """read(offset, count) over the layer below, clipped to its end, remembering what it read."""
    def read(offset: int, count: int) -> bytes:
        count = max(0, min(count, size - offset))
        buf = bytearray(count)
        if count:
            next.pread(memoryview(buf), offset, 0)
        seen.append((offset, bytes(buf)))
        return bytes(buf)
    return read


def _source(value: str) -> str:
    """Where a passphrase=VALUE comes from, for messages."""
    if value.startswith("+"):
        return f"file {value[1:]!r}"
    if value == "-":
        return "standard input"
    if value.startswith("-") and value[1:].isdigit():
        return f"file descriptor {value[1:]}"
    return "passphrase="


class LuksConnection(FilterConnection["LuksFilter"]):
    def __init__(self, next: Connection, filter: LuksFilter, ctx: OpenContext) -> None:
        super().__init__(next, filter, ctx)
        below = next.get_size()
        unlocked = filter.unlock(next, below)
        self.cipher = unlocked.cipher
        self.sector = unlocked.volume.sector_size
        self.start = unlocked.volume.data_offset
        self.size = unlocked.volume.payload_size(below)
        self.edge_lock = filter.edge_lock

    def get_size(self) -> int:
        return self.size

    def can_trim(self) -> bool:
        return False

    def can_zero(self) -> bool:
        return self.next.can_write()

    def can_fast_zero(self) -> bool:
        return False

    def can_extents(self) -> bool:
        return False

    def block_size(self) -> tuple[int, int, int]:
        minimum, preferred, maximum = self.next.block_size()  # 0: no preference
        return max(minimum, self.sector), max(preferred, 4096, self.sector), maximum

    def _span(self, count: int, offset: int) -> tuple[int, int]:
        """The first sector and the byte length of the whole sectors covering the range."""
        first = offset // self.sector
        end = -(-(offset + count) // self.sector)
        return first, (end - first) * self.sector

    def _read_sectors(self, buf: memoryview, first: int) -> None:
        self.next.pread(buf, self.start + first * self.sector, 0)
        self.cipher.decrypt(buf, first)

    def pread(self, buf: memoryview, offset: int, flags: int) -> None:
        sector = self.sector
        if not offset % sector and not len(buf) % sector:
            self._read_sectors(buf, offset // sector)
            return
        first, length = self._span(len(buf), offset)
        scratch = memoryview(bytearray(length))
        self._read_sectors(scratch, first)
        inner = offset - first * sector
        buf[:] = scratch[inner:inner + len(buf)]

    def _write_sectors(self, plain: memoryview, first: int, flags: int) -> None:
        """Encrypt a copy of whole sectors and write it below."""
        data = memoryview(bytearray(plain))
        self.cipher.encrypt(data, first)
        self.next.pwrite(data, self.start + first * self.sector, flags)

    def pwrite(self, buf: memoryview, offset: int, flags: int) -> None:
        sector = self.sector
        if not offset % sector and not len(buf) % sector:
            self._write_sectors(buf, offset // sector, flags)
            return
        first, length = self._span(len(buf), offset)
        inner = offset - first * sector
        scratch = memoryview(bytearray(length))
        # Read-modify-write of the partial sectors at the edges: one at a time, over all
        # connections (they share the disk below).
        with self.edge_lock:
            self._read_sectors(scratch, first)
            scratch[inner:inner + len(buf)] = buf
            self._write_sectors(scratch, first, flags)

    def zero(self, count: int, offset: int, flags: int) -> None:
        zeroes = memoryview(bytes(min(count, _ZERO_CHUNK)))
        end = offset + count
        flags &= FLAG_FUA  # (MAY_TRIM means nothing here: zeroes are written encrypted)
        while offset < end:
            take = min(end - offset, len(zeroes))
            self.pwrite(zeroes[:take], offset, flags)
            offset += take

    def cache(self, count: int, offset: int, flags: int) -> None:
        first, length = self._span(count, offset)
        self.next.cache(length, self.start + first * self.sector, flags)


class LuksFilter(Filter):
    short_requests = True
    name = "luks"
    params = (
        Param("passphrase", "str", "the passphrase: SECRET, +FILE, - (terminal) or -FD"),
        Param("passphrase-env", "str", "read the passphrase from this environment variable"),
    )
    passphrase: str | None
    passphrase_env: str | None
    connection = LuksConnection

    def config_complete(self) -> None:
        if (self.passphrase is None) == (self.passphrase_env is None):
            raise ConfigError("luks: give one of passphrase=… or passphrase-env=VAR")
        if self.passphrase_env is not None:
            secret = os.environ.get(self.passphrase_env)
            if secret is None:
                raise ConfigError(f"luks: passphrase-env: environment variable "
                                  f"{self.passphrase_env!r} is not set")
            where = f"environment variable {self.passphrase_env!r}"
        else:
            assert self.passphrase is not None
            try:
                secret = read_secret(self.passphrase)
            except OSError as exc:
                name = exc.filename or self.passphrase
                raise ConfigError(f"luks: passphrase: cannot read {name}: "
                                  f"{exc.strerror or exc}") from None
            where = _source(self.passphrase)
        if not secret:
            raise ConfigError(f"luks: the passphrase from {where} is empty")
        self.secret = secret.encode("utf-8")
        self._lock = threading.Lock()
        self.edge_lock = threading.Lock()
        self._cache: tuple[tuple[tuple[int, bytes], ...], Unlocked] | None = None

    def get_ready(self) -> None:
        """Open the volume before the server listens, so that a wrong passphrase or an
        unreadable header stops the server at start with one line (the key is kept
        for the clients). A layer below that cannot be opened without a client (an
        export chosen by name, a proxy whose upstream is not up yet) is left to the
        first client's open, which reports the same errors."""
        try:
            below = self.open_below(OpenContext(readonly=True))
        except (OSError, ConfigError) as exc:
            log.debug("luks: the volume is opened when a client connects (%s)", exc)
            return
        try:
            self._unlock(below, below.get_size())
        except LuksError as exc:
            raise ConfigError(f"luks: {exc}") from None
        finally:
            below.close()

    def unlock(self, next: Connection, size: int) -> Unlocked:
        """The volume below opened with the passphrase (cached while the header is
        unchanged); a refusal is EACCES for the client that asked."""
        try:
            return self._unlock(next, size)
        except LuksError as exc:
            raise io_error(errno.EACCES, f"luks: {exc}") from None

    def _unlock(self, next: Connection, size: int) -> Unlocked:
        seen: list[tuple[int, bytes]] = []
        read = _reader(next, size, seen)
        with self._lock:
            volume = read_volume(read)
            header = tuple(seen)
            if self._cache is not None and self._cache[0] == header:
                return self._cache[1]
            for note in volume.notes:
                log.warning("luks: %s", note)
            keyslot, key = unlock(volume, read, self.secret)
            log.debug("luks: LUKS%d %s, keyslot %d opened, payload at %d",
                      volume.version, volume.cipher, keyslot, volume.data_offset)
            self._cache = (header, Unlocked(volume, keyslot, key))
            return self._cache[1]
