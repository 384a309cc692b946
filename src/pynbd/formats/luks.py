"""LUKS1 and LUKS2 headers, keyslots and sector ciphers, read through a callable.

    from pynbd.formats.luks import read_volume, unlock, SectorCipher

    def read(offset: int, count: int) -> bytes: ...
    volume = read_volume(read)                  # LUKS1 or LUKS2, both header copies checked
    key = unlock(volume, read, b"passphrase")   # the volume key, or WrongPassphrase
    cipher = volume.data_cipher(key)
    cipher.decrypt(view, first_sector)          # whole sectors, in place

``format_luks1`` and ``format_luks2`` build new headers (with keyslot 0
holding the passphrase) for ``pynbd luks format``. The module is pure: it
reads and writes bytes through callables and opens nothing itself.

What is understood
    LUKS1 (the format of ``qemu-img create -f luks`` and ``cryptsetup
    luksFormat --type luks1``): the 592-byte header, the master-key digest
    and the eight PBKDF2 keyslots.
    LUKS2 (cryptsetup's default): both binary headers and their checksums
    (the copy with the higher sequence number wins; a damaged one is
    reported in ``Volume.notes``), the JSON metadata (one ``crypt``
    segment, ``luks2`` keyslots with ``pbkdf2``, ``argon2i`` or
    ``argon2id`` KDFs, ``pbkdf2`` digests; tokens are ignored), 512- to
    4096-byte sectors, the data offset and the IV tweak.
    Ciphers: AES in ``xts-plain64``, ``xts-plain``, ``cbc-plain64``,
    ``cbc-plain`` and ``cbc-essiv:HASH`` modes; hashes sha1, sha224, sha256,
    sha384, sha512 (PBKDF2 and the anti-forensic splitter).

The cryptography is OpenSSL's through the ``cryptography`` package (AES,
PBKDF2), with the data path's sector runs through libcrypto's EVP interface
(``formats.evp``, one context reused per thread), and libargon2's through
``argon2-cffi``; nothing here is a cipher.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import struct
import sys
import threading
import uuid
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from argon2.exceptions import Argon2Error
from argon2.low_level import Type as Argon2Type
from argon2.low_level import hash_secret_raw
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC

from .evp import EvpSectors
from .evp import load as evp_load

Reader = Callable[[int, int], bytes]
Writer = Callable[[int, bytes], None]

MAGIC = b"LUKS\xba\xbe"
MAGIC2_SECONDARY = b"SKUL\xba\xbe"
SECTOR = 512
STRIPES = 4000
LUKS1_ACTIVE = 0x00AC71F3
LUKS1_INACTIVE = 0x0000DEAD
# Where cryptsetup looks for a LUKS2 secondary header when the primary is unreadable.
LUKS2_HEADER_OFFSETS = (0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000,
                        0x200000, 0x400000)

_LUKS1 = struct.Struct(">6sH32s32s32sII20s32sI40s")
_LUKS1_SLOT = struct.Struct(">II32sII")
_LUKS1_SIZE = _LUKS1.size + 8 * _LUKS1_SLOT.size  # 592
_LUKS2 = struct.Struct(">6sHQQ48s32s64s40s48sQ184s64s")  # the 512 bytes of a binary header
_LUKS2_CSUM = slice(448, 512)
_LUKS2_BINARY = 4096

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256,
    "sha384": hashes.SHA384, "sha512": hashes.SHA512,
}


class LuksError(Exception):
    """A LUKS image this module cannot use; the message is one line for the user."""


class UnsupportedLuks(LuksError):
    """A cipher, mode, hash, KDF or keyslot type this module does not implement."""


class WrongPassphrase(LuksError):
    """The passphrase opens none of the keyslots tried."""


def _hash_name(name: str) -> str:
    lowered = name.lower()
    if lowered not in _HASHES:
        raise UnsupportedLuks(f"unsupported hash {name!r} (supported: {', '.join(_HASHES)})")
    return lowered


def pbkdf2(hash_name: str, secret: bytes, salt: bytes, iterations: int, length: int) -> bytes:
    """PBKDF2-HMAC through OpenSSL."""
    algorithm = _HASHES[_hash_name(hash_name)]()
    return PBKDF2HMAC(algorithm=algorithm, length=length, salt=salt,
                      iterations=iterations).derive(secret)


# ----------------------------------------------------------------- sector ciphers
def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


@dataclass(frozen=True)
class CipherSpec:
    """``aes-xts-plain64`` split into its parts (LUKS1 keeps name and mode apart)."""

    name: str
    mode: str       # xts or cbc
    iv: str         # plain64, plain or essiv
    essiv_hash: str = ""

    @classmethod
    def parse(cls, name: str, mode: str) -> CipherSpec:
        """``name`` is ``aes``, ``mode`` is ``xts-plain64`` (or ``cbc-essiv:sha256``)."""
        full = f"{name}-{mode}"
        if name.lower() != "aes":
            raise UnsupportedLuks(f"unsupported cipher {full!r} (only aes is supported)")
        chain, _, iv = mode.lower().partition("-")
        if chain not in ("xts", "cbc"):
            raise UnsupportedLuks(f"unsupported cipher mode {full!r} (supported: xts, cbc)")
        iv_name, _, essiv_hash = iv.partition(":")
        if iv_name not in ("plain64", "plain", "essiv") or (iv_name == "essiv") != bool(essiv_hash):
            raise UnsupportedLuks(f"unsupported IV generator in {full!r} "
                                  "(supported: plain64, plain, essiv:HASH)")
        if iv_name == "essiv" and essiv_hash not in hashlib.algorithms_available:
            raise UnsupportedLuks(f"unsupported ESSIV hash in {full!r}")
        return cls("aes", chain, iv_name, essiv_hash)

    @classmethod
    def parse_full(cls, encryption: str) -> CipherSpec:
        """A LUKS2 ``encryption`` string such as ``aes-xts-plain64``."""
        name, sep, mode = encryption.partition("-")
        if not sep:
            raise UnsupportedLuks(f"unsupported cipher {encryption!r}")
        return cls.parse(name, mode)

    @property
    def mode_string(self) -> str:
        iv = f"essiv:{self.essiv_hash}" if self.iv == "essiv" else self.iv
        return f"{self.mode}-{iv}"

    def __str__(self) -> str:
        return f"{self.name}-{self.mode_string}"

    def check_key(self, key_bytes: int) -> None:
        sizes = (32, 64) if self.mode == "xts" else (16, 24, 32)
        if key_bytes not in sizes:
            raise UnsupportedLuks(f"{self}: unsupported key size {key_bytes * 8} bits "
                                  f"(supported: {', '.join(str(s * 8) for s in sizes)})")


class SectorCipher:
    """Encrypts and decrypts runs of whole sectors in place, as dm-crypt does.

    ``sector`` numbers passed in count ``sector_size`` units from the start
    of the encrypted area; the IV of a sector is its offset in 512-byte
    units plus ``iv_tweak``, whatever the sector size (cryptsetup does not
    give LUKS2 dm-crypt's ``iv_large_sectors``). The sectors go through
    libcrypto's EVP interface (``formats.evp``: one context per thread, a new
    IV per sector) where it loads, else through one ``cryptography`` Cipher
    per sector; ``use_evp=False`` asks for the latter.
    """

    def __init__(self, spec: CipherSpec, key: bytes, sector_size: int = SECTOR,
                 iv_tweak: int = 0, use_evp: bool = True) -> None:
        spec.check_key(len(key))
        self.spec = spec
        self.sector_size = sector_size
        self.iv_step = sector_size // SECTOR
        self.iv_tweak = iv_tweak
        self.algorithm = algorithms.AES(key)
        self.mode = modes.XTS if spec.mode == "xts" else modes.CBC
        self.essiv_key = hashlib.new(spec.essiv_hash, key).digest() if spec.iv == "essiv" else b""
        self.local = threading.local()  # ESSIV's ECB context, one per thread
        self.evp = EvpSectors(spec.mode, key) if use_evp and evp_load() is not None else None

    def ivs(self, sector: int, count: int) -> bytes:
        """The 16-byte IVs of ``count`` sectors from ``sector``, end to end."""
        first = self.iv_tweak + sector * self.iv_step
        numbers = range(first, first + count * self.iv_step, self.iv_step)
        words = array("Q", bytes(16 * count))
        words[0::2] = array("Q", numbers if self.spec.iv != "plain"
                            else [n & 0xFFFFFFFF for n in numbers])
        if sys.byteorder == "big":
            words.byteswap()
        if not self.essiv_key:
            return words.tobytes()
        essiv: CipherContext | None = getattr(self.local, "essiv", None)
        if essiv is None:
            essiv = self.local.essiv = Cipher(algorithms.AES(self.essiv_key), modes.ECB()).encryptor()
        return essiv.update(words.tobytes())

    def _run(self, buf: memoryview, sector: int, encrypt: bool) -> None:
        size = self.sector_size
        if len(buf) % size:
            raise ValueError(f"{len(buf)} bytes is not a whole number of {size}-byte sectors")
        ivs = self.ivs(sector, len(buf) // size)
        if self.evp is not None:
            self.evp.run(buf, size, ivs, encrypt)
            return
        algorithm, mode = self.algorithm, self.mode
        for index, pos in enumerate(range(0, len(buf), size)):
            cipher = Cipher(algorithm, mode(ivs[16 * index:16 * index + 16]))
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            piece = buf[pos:pos + size]
            piece[:] = ctx.update(piece)

    def decrypt(self, buf: memoryview, sector: int) -> None:
        """Decrypt whole sectors in place; ``sector`` is the number of the first."""
        self._run(buf, sector, False)

    def encrypt(self, buf: memoryview, sector: int) -> None:
        """Encrypt whole sectors in place; ``sector`` is the number of the first."""
        self._run(buf, sector, True)


# ------------------------------------------------------- anti-forensic splitter
class _Diffuser:
    """LUKS's diffusion of one stripe: each hash-sized piece replaced by
    H(piece number, big-endian 32 bits || piece), the last piece truncated."""

    def __init__(self, hash_name: str, length: int) -> None:
        self.empty = hashlib.new(_hash_name(hash_name))
        size = self.empty.digest_size
        # (prefix, start, end) of each piece: computed once for the thousands of stripes.
        self.pieces = [(struct.pack(">I", i), pos, min(pos + size, length))
                       for i, pos in enumerate(range(0, length, size))]

    def __call__(self, data: bytes) -> bytes:
        out = []
        for prefix, start, end in self.pieces:
            h = self.empty.copy()
            h.update(prefix)
            h.update(data[start:end])
            out.append(h.digest()[:end - start])
        return b"".join(out)


def af_merge(material: bytes, key_bytes: int, stripes: int, hash_name: str) -> bytes:
    """The key that the anti-forensic split ``material`` holds."""
    diffuse = _Diffuser(hash_name, key_bytes)
    digest = 0
    for pos in range(0, (stripes - 1) * key_bytes, key_bytes):
        mixed = digest ^ int.from_bytes(material[pos:pos + key_bytes], "little")
        digest = int.from_bytes(diffuse(mixed.to_bytes(key_bytes, "little")), "little")
    last = (stripes - 1) * key_bytes
    return _xor(digest.to_bytes(key_bytes, "little"), material[last:last + key_bytes])


def af_split(key: bytes, stripes: int, hash_name: str) -> bytes:
    """Spread ``key`` over ``stripes`` random-looking stripes (the inverse of af_merge)."""
    size = len(key)
    diffuse = _Diffuser(hash_name, size)
    material = os.urandom(size * (stripes - 1))
    digest = bytes(size)
    for pos in range(0, len(material), size):
        digest = diffuse(_xor(digest, material[pos:pos + size]))
    return material + _xor(digest, key)


def af_sectors(key_bytes: int, stripes: int) -> int:
    """The 512-byte sectors a keyslot's split key material occupies."""
    return -(-key_bytes * stripes // SECTOR)


# ----------------------------------------------------------------- the volume
@dataclass(frozen=True)
class Kdf:
    """How a keyslot turns the passphrase into its key."""

    type: str                   # pbkdf2, argon2i, argon2id
    salt: bytes
    hash: str = "sha256"
    iterations: int = 0         # pbkdf2: iterations; argon2: time cost
    memory: int = 0             # argon2: KiB
    cpus: int = 1               # argon2: lanes

    def derive(self, passphrase: bytes, length: int) -> bytes:
        if self.type == "pbkdf2":
            return pbkdf2(self.hash, passphrase, self.salt, self.iterations, length)
        kind = Argon2Type.ID if self.type == "argon2id" else Argon2Type.I
        return hash_secret_raw(passphrase, self.salt, time_cost=self.iterations,
                               memory_cost=self.memory, parallelism=self.cpus,
                               hash_len=length, type=kind, version=0x13)

    def describe(self) -> str:
        if self.type == "pbkdf2":
            return f"pbkdf2 {self.hash} {self.iterations} iterations"
        return f"{self.type} time {self.iterations} memory {self.memory} KiB cpus {self.cpus}"


@dataclass(frozen=True)
class Keyslot:
    """One active keyslot: where its split key lies and how it is protected."""

    index: int
    kdf: Kdf
    key_bytes: int          # the volume key's size
    area_offset: int        # bytes from the start of the image
    area_cipher: CipherSpec
    area_key_bytes: int
    stripes: int
    af_hash: str
    priority: int = 1       # LUKS2: 2 is tried first, 0 only when named

    def open(self, read: Reader, passphrase: bytes) -> bytes:
        """The candidate volume key this passphrase unlocks (not yet checked)."""
        try:
            derived = self.kdf.derive(passphrase, self.area_key_bytes)
        except (Argon2Error, ValueError) as exc:  # costs the KDF refuses (0 iterations, ...)
            raise LuksError(f"keyslot {self.index}: {self.kdf.describe()}: {exc}") from None
        length = af_sectors(self.key_bytes, self.stripes) * SECTOR
        material = bytearray(read(self.area_offset, length))
        if len(material) != length:
            raise LuksError(f"keyslot {self.index}: key material is past the end of the image")
        SectorCipher(self.area_cipher, derived).decrypt(memoryview(material), 0)
        return af_merge(bytes(material), self.key_bytes, self.stripes, self.af_hash)


@dataclass(frozen=True)
class Digest:
    """A PBKDF2 digest of the volume key, and the keyslots it checks."""

    hash: str
    iterations: int
    salt: bytes
    value: bytes
    keyslots: frozenset[int]

    def matches(self, key: bytes) -> bool:
        return hmac.compare_digest(pbkdf2(self.hash, key, self.salt, self.iterations,
                                          len(self.value)), self.value)


@dataclass
class Volume:
    """A parsed LUKS header: the data segment, the keyslots and the digests."""

    version: int
    cipher: CipherSpec
    key_bytes: int
    data_offset: int                # bytes
    data_size: int | None           # bytes, None: to the end of the image
    sector_size: int = SECTOR
    iv_tweak: int = 0
    uuid: str = ""
    keyslots: list[Keyslot] = field(default_factory=list)
    digests: list[Digest] = field(default_factory=list)
    # Keyslots that are present but cannot be used: (index, why).
    unusable: list[tuple[int, str]] = field(default_factory=list)
    # Things worth a log line (a damaged header copy that was skipped).
    notes: list[str] = field(default_factory=list)

    def payload_size(self, image_size: int) -> int:
        """The decrypted disk's size on an image of ``image_size`` bytes."""
        end = image_size if self.data_size is None else min(image_size,
                                                            self.data_offset + self.data_size)
        size = max(0, end - self.data_offset)
        return size - size % self.sector_size

    def data_cipher(self, key: bytes) -> SectorCipher:
        return SectorCipher(self.cipher, key, self.sector_size, self.iv_tweak)

    def check_key(self, slot: Keyslot, key: bytes) -> bool:
        return any(d.matches(key) for d in self.digests if slot.index in d.keyslots)


def unlock(volume: Volume, read: Reader, passphrase: bytes,
           keyslot: int | None = None) -> tuple[int, bytes]:
    """(keyslot, volume key) for the first keyslot the passphrase opens.

    LUKS2 keyslots of priority 2 are tried first and those of priority 0
    only when named. WrongPassphrase names the keyslots tried.
    """
    if keyslot is not None:
        slots = [s for s in volume.keyslots if s.index == keyslot]
        if not slots:
            unusable = dict(volume.unusable)
            why = f": {unusable[keyslot]}" if keyslot in unusable else " or is not active"
            raise LuksError(f"keyslot {keyslot} cannot be used{why}")
    else:
        slots = sorted((s for s in volume.keyslots if s.priority > 0),
                       key=lambda s: (-s.priority, s.index))
    if not slots:
        why = "; ".join(f"keyslot {i}: {reason}" for i, reason in volume.unusable)
        raise UnsupportedLuks(f"no usable keyslot{' (' + why + ')' if why else ''}")
    for slot in slots:
        key = slot.open(read, passphrase)
        if volume.check_key(slot, key):
            return slot.index, key
    tried = ", ".join(str(s.index) for s in slots)
    skipped = "".join(f"; keyslot {i} skipped: {reason}" for i, reason in volume.unusable)
    plural = "s" if len(slots) > 1 else ""
    raise WrongPassphrase(f"the passphrase matches no keyslot (tried keyslot{plural} {tried}{skipped})")


def read_volume(read: Reader) -> Volume:
    """Parse the LUKS1 or LUKS2 header of an image."""
    start = read(0, 8)
    if start[:6] == MAGIC and start[6:8] == b"\0\1":
        return _read_luks1(read)
    if start[:6] == MAGIC and start[6:8] == b"\0\2":
        return _read_luks2(read)
    if start[:6] == MAGIC:
        raise UnsupportedLuks(f"unsupported LUKS version {int.from_bytes(start[6:8], 'big')}")
    # The primary LUKS2 header may be the damaged part: look for a secondary.
    for offset in LUKS2_HEADER_OFFSETS:
        if read(offset, 6) == MAGIC2_SECONDARY:
            return _read_luks2(read)
    raise LuksError("not a LUKS image (no LUKS magic at offset 0 and no LUKS2 secondary header)")


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


# ------------------------------------------------------------------------ LUKS1
def _read_luks1(read: Reader) -> Volume:
    raw = read(0, _LUKS1_SIZE)
    if len(raw) < _LUKS1_SIZE:
        raise LuksError("LUKS1 header is truncated")
    (_, _, cipher_name, cipher_mode, hash_spec, payload, key_bytes, mk_digest, mk_salt,
     mk_iterations, uuid_text) = _LUKS1.unpack_from(raw)
    spec = CipherSpec.parse(_cstr(cipher_name), _cstr(cipher_mode))
    spec.check_key(key_bytes)
    hash_name = _hash_name(_cstr(hash_spec))
    volume = Volume(1, spec, key_bytes, payload * SECTOR, None, uuid=_cstr(uuid_text))
    volume.digests.append(Digest(hash_name, mk_iterations, mk_salt, mk_digest, frozenset(range(8))))
    for index in range(8):
        active, iterations, salt, material, stripes = _LUKS1_SLOT.unpack_from(
            raw, _LUKS1.size + index * _LUKS1_SLOT.size)
        if active == LUKS1_ACTIVE:
            if stripes < 1 or iterations < 1:
                volume.unusable.append((index, f"bad stripes {stripes} or iterations {iterations}"))
                continue
            volume.keyslots.append(Keyslot(index, Kdf("pbkdf2", salt, hash_name, iterations),
                                           key_bytes, material * SECTOR, spec, key_bytes,
                                           stripes, hash_name))
        elif active != LUKS1_INACTIVE:
            volume.unusable.append((index, f"bad keyslot state 0x{active:08x}"))
    return volume


def luks1_layout(key_bytes: int, stripes: int = STRIPES) -> tuple[list[int], int]:
    """cryptsetup's LUKS1 layout: keyslot offsets and the payload offset, in sectors."""
    slot_sectors = -(-af_sectors(key_bytes, stripes) // 8) * 8
    offsets = [8 + i * slot_sectors for i in range(8)]
    end = offsets[-1] + slot_sectors
    return offsets, -(-end // 2048) * 2048


def format_luks1(write: Writer, passphrase: bytes, spec: CipherSpec, key_bytes: int,
                 hash_name: str, iterations: int, digest_iterations: int,
                 key: bytes | None = None) -> Volume:
    """Write a LUKS1 header with keyslot 0; the volume (its key unlocks it) is returned."""
    spec.check_key(key_bytes)
    hash_name = _hash_name(hash_name)
    key = os.urandom(key_bytes) if key is None else key
    offsets, payload = luks1_layout(key_bytes)
    mk_salt, slot_salt = os.urandom(32), os.urandom(32)
    mk_digest = pbkdf2(hash_name, key, mk_salt, digest_iterations, 20)
    header = bytearray(_LUKS1.pack(MAGIC, 1, b"aes", spec.mode_string.encode(), hash_name.encode(),
                                   payload, key_bytes, mk_digest, mk_salt, digest_iterations,
                                   str(uuid.uuid4()).encode()))
    for index, offset in enumerate(offsets):
        if index == 0:
            header += _LUKS1_SLOT.pack(LUKS1_ACTIVE, iterations, slot_salt, offset, STRIPES)
        else:
            header += _LUKS1_SLOT.pack(LUKS1_INACTIVE, 0, bytes(32), offset, STRIPES)
    write(0, bytes(header).ljust(offsets[0] * SECTOR, b"\0"))
    kdf = Kdf("pbkdf2", slot_salt, hash_name, iterations)
    _write_keyslot(write, key, passphrase, kdf, spec, offsets[0] * SECTOR, hash_name)
    return _read_luks1(lambda offset, count: bytes(header[offset:offset + count]))


def _write_keyslot(write: Writer, key: bytes, passphrase: bytes, kdf: Kdf, spec: CipherSpec,
                   offset: int, af_hash: str) -> None:
    """Split ``key``, encrypt it with the passphrase's derived key, write it at ``offset``."""
    derived = kdf.derive(passphrase, len(key))
    length = af_sectors(len(key), STRIPES) * SECTOR
    material = bytearray(af_split(key, STRIPES, af_hash).ljust(length, b"\0"))
    SectorCipher(spec, derived).encrypt(memoryview(material), 0)
    write(offset, bytes(material))


# ------------------------------------------------------------------------ LUKS2
def _b64(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        raise LuksError(f"LUKS2 metadata: {what} is not base64") from None


def _number(value: Any, what: str) -> int:
    """JSON numbers that LUKS2 writes as strings ("16777216") or integers."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise LuksError(f"LUKS2 metadata: {what} is not a number: {value!r}") from None
    if number < 0:
        raise LuksError(f"LUKS2 metadata: {what} is negative")
    return number


def _luks2_copy(read: Reader, offset: int) -> tuple[int, dict[str, Any]]:
    """(seqid, metadata) of the header copy at ``offset``; LuksError says what is wrong."""
    raw = read(offset, _LUKS2_BINARY)
    if len(raw) < _LUKS2_BINARY:
        raise LuksError("truncated")
    (magic, version, hdr_size, seqid, _, csum_alg, _, _, _, hdr_offset, _,
     csum) = _LUKS2.unpack_from(raw)
    want = MAGIC if offset == 0 else MAGIC2_SECONDARY
    if magic != want or version != 2:
        raise LuksError("bad magic or version")
    if hdr_size < 0x4000 or hdr_size > 0x400000 or hdr_size & (hdr_size - 1):
        raise LuksError(f"bad header size {hdr_size}")
    if hdr_offset != offset:
        raise LuksError(f"header says it is at offset {hdr_offset}, found at {offset}")
    algorithm = _cstr(csum_alg)
    if algorithm not in hashlib.algorithms_available:
        raise UnsupportedLuks(f"unsupported checksum algorithm {algorithm!r}")
    area = bytearray(read(offset, hdr_size))
    if len(area) < hdr_size:
        raise LuksError("truncated")
    area[_LUKS2_CSUM] = bytes(64)
    checksum = hashlib.new(algorithm, area)
    if checksum.digest() != csum[:checksum.digest_size]:
        raise LuksError("checksum mismatch")
    text = bytes(area[_LUKS2_BINARY:]).split(b"\0", 1)[0]
    try:
        metadata = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LuksError(f"malformed JSON metadata ({exc})") from None
    if not isinstance(metadata, dict):
        raise LuksError("malformed JSON metadata (not an object)")
    return seqid, metadata


def _read_luks2(read: Reader) -> Volume:
    """Both header copies checked; the valid one with the higher sequence number is used."""
    good: list[tuple[int, str, dict[str, Any]]] = []
    bad: list[tuple[str, str]] = []
    try:
        good.append(_with_name(_luks2_copy(read, 0), "primary"))
    except UnsupportedLuks:
        raise
    except LuksError as exc:
        bad.append(("primary", str(exc)))
    if good:
        offsets: tuple[int, ...] = (struct.unpack(">Q", read(8, 8))[0],)
    else:
        offsets = tuple(o for o in LUKS2_HEADER_OFFSETS if read(o, 6) == MAGIC2_SECONDARY)[:1]
    if not offsets:
        bad.append(("secondary", "not found"))
    for offset in offsets:
        try:
            good.append(_with_name(_luks2_copy(read, offset), "secondary"))
        except UnsupportedLuks:
            raise
        except LuksError as exc:
            bad.append(("secondary", str(exc)))
    if not good:
        raise LuksError("both LUKS2 header copies are damaged ("
                        + "; ".join(f"{which}: {why}" for which, why in bad) + ")")
    seqid, which, metadata = max(good, key=lambda c: c[0])
    try:
        volume = _luks2_volume(metadata)
    except (AttributeError, TypeError, ValueError, KeyError) as exc:  # a field of the wrong shape
        raise LuksError(f"malformed LUKS2 metadata ({type(exc).__name__}: {exc})") from None
    for other, why in bad:
        volume.notes.append(f"LUKS2 {other} header is damaged ({why}): using the {which} copy")
    if len(good) == 2 and good[0][0] != good[1][0]:
        volume.notes.append(f"LUKS2 header copies differ: using the {which} (sequence {seqid})")
    return volume


def _with_name(copy: tuple[int, dict[str, Any]], which: str) -> tuple[int, str, dict[str, Any]]:
    return copy[0], which, copy[1]


def _object(parent: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = parent.get(key)
    if not isinstance(value, dict):
        raise LuksError(f"LUKS2 metadata: {where}{key} is missing or not an object")
    return value


def _luks2_volume(metadata: dict[str, Any]) -> Volume:
    config = metadata.get("config", {})
    requirements = config.get("requirements", {}).get("mandatory", []) if isinstance(config, dict) else []
    if requirements:
        raise UnsupportedLuks(f"unsupported LUKS2 requirements: {', '.join(map(str, requirements))} "
                              "(an interrupted reencryption? finish it with cryptsetup)")
    segments = _object(metadata, "segments", "")
    if len(segments) != 1:
        raise UnsupportedLuks(f"{len(segments)} data segments (only one is supported)")
    (segment_id, segment), = segments.items()
    if not isinstance(segment, dict) or segment.get("type") != "crypt":
        kind = segment.get("type") if isinstance(segment, dict) else segment
        raise UnsupportedLuks(f"unsupported segment type {kind!r}")
    if "integrity" in segment:
        raise UnsupportedLuks("segments with integrity protection are not supported")
    spec = CipherSpec.parse_full(str(segment.get("encryption", "")))
    sector_size = _number(segment.get("sector_size", SECTOR), "sector_size")
    if sector_size not in (512, 1024, 2048, 4096):
        raise UnsupportedLuks(f"unsupported sector size {sector_size}")
    size_field = segment.get("size", "dynamic")
    data_size = None if size_field == "dynamic" else _number(size_field, "segment size")
    digests: list[Digest] = []
    key_bytes = 0
    for digest_id, digest in _object(metadata, "digests", "").items():
        if not isinstance(digest, dict):
            raise LuksError(f"LUKS2 metadata: digest {digest_id} is not an object")
        if segment_id not in [str(s) for s in digest.get("segments", [])]:
            continue
        if digest.get("type") != "pbkdf2":
            raise UnsupportedLuks(f"unsupported digest type {digest.get('type')!r}")
        digests.append(Digest(_hash_name(str(digest.get("hash"))),
                              _number(digest.get("iterations"), "digest iterations"),
                              _b64(digest.get("salt"), "digest salt"),
                              _b64(digest.get("digest"), "digest"),
                              frozenset(_number(k, "digest keyslot") for k in digest.get("keyslots", []))))
    if not digests:
        raise LuksError(f"LUKS2 metadata: no digest covers segment {segment_id}")
    volume = Volume(2, spec, 0, _number(segment.get("offset"), "segment offset"), data_size,
                    sector_size, _number(segment.get("iv_tweak", 0), "iv_tweak"),
                    digests=digests)
    covered = frozenset().union(*(d.keyslots for d in digests))
    for slot_id, slot in sorted(_object(metadata, "keyslots", "").items(), key=lambda kv: int(kv[0])):
        index = _number(slot_id, "keyslot number")
        if index not in covered:
            continue
        try:
            volume.keyslots.append(_luks2_keyslot(index, slot))
        except UnsupportedLuks as exc:
            volume.unusable.append((index, str(exc)))
    key_sizes = {s.key_bytes for s in volume.keyslots}
    key_bytes = key_sizes.pop() if len(key_sizes) == 1 else 0
    if key_bytes:
        spec.check_key(key_bytes)
    volume.key_bytes = key_bytes
    return volume


def _luks2_keyslot(index: int, slot: Any) -> Keyslot:
    if not isinstance(slot, dict):
        raise LuksError(f"LUKS2 metadata: keyslot {index} is not an object")
    if slot.get("type") != "luks2":
        raise UnsupportedLuks(f"unsupported keyslot type {slot.get('type')!r}")
    where = f"keyslots.{index}."
    kdf = _object(slot, "kdf", where)
    af = _object(slot, "af", where)
    area = _object(slot, "area", where)
    if af.get("type") != "luks1":
        raise UnsupportedLuks(f"unsupported anti-forensic splitter {af.get('type')!r}")
    if area.get("type") != "raw":
        raise UnsupportedLuks(f"unsupported keyslot area type {area.get('type')!r}")
    kind = kdf.get("type")
    salt = _b64(kdf.get("salt"), f"keyslot {index} salt")
    if kind == "pbkdf2":
        parsed = Kdf("pbkdf2", salt, _hash_name(str(kdf.get("hash"))),
                     _number(kdf.get("iterations"), "iterations"))
    elif kind in ("argon2i", "argon2id"):
        parsed = Kdf(str(kind), salt, iterations=_number(kdf.get("time"), "argon2 time"),
                     memory=_number(kdf.get("memory"), "argon2 memory"),
                     cpus=_number(kdf.get("cpus"), "argon2 cpus"))
    else:
        raise UnsupportedLuks(f"unsupported KDF {kind!r}")
    area_spec = CipherSpec.parse_full(str(area.get("encryption", "")))
    area_key = _number(area.get("key_size"), "area key_size")
    area_spec.check_key(area_key)
    priority = _number(slot.get("priority", 1), "priority")
    return Keyslot(index, parsed, _number(slot.get("key_size"), "key_size"),
                   _number(area.get("offset"), "area offset"), area_spec, area_key,
                   _number(af.get("stripes"), "stripes"), _hash_name(str(af.get("hash"))),
                   priority)


LUKS2_HEADER_SIZE = 0x4000
LUKS2_KEYSLOTS_OFFSET = 2 * LUKS2_HEADER_SIZE


def _luks2_binary(metadata: dict[str, Any], offset: int, seqid: int, uuid_text: str,
                  label: str) -> bytes:
    text = json.dumps(metadata, separators=(",", ":")).encode()
    json_size = LUKS2_HEADER_SIZE - _LUKS2_BINARY
    if len(text) >= json_size:
        raise LuksError("LUKS2 metadata does not fit its area")
    magic = MAGIC if offset == 0 else MAGIC2_SECONDARY
    header = bytearray(_LUKS2.pack(magic, 2, LUKS2_HEADER_SIZE, seqid, label.encode(), b"sha256",
                                   os.urandom(64), uuid_text.encode(), b"", offset, b"", b""))
    area = header.ljust(_LUKS2_BINARY, b"\0") + text.ljust(json_size, b"\0")
    area[_LUKS2_CSUM] = hashlib.sha256(area).digest().ljust(64, b"\0")
    return bytes(area)


def _b64text(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def format_luks2(write: Writer, passphrase: bytes, spec: CipherSpec, key_bytes: int, kdf: Kdf,
                 digest_hash: str, digest_iterations: int, sector_size: int = SECTOR,
                 data_offset: int = 16 << 20, label: str = "",
                 key: bytes | None = None) -> Volume:
    """Write both LUKS2 header copies with keyslot 0; the parsed volume is returned."""
    spec.check_key(key_bytes)
    digest_hash = _hash_name(digest_hash)
    key = os.urandom(key_bytes) if key is None else key
    area_size = -(-af_sectors(key_bytes, STRIPES) * SECTOR // 4096) * 4096
    if LUKS2_KEYSLOTS_OFFSET + area_size > data_offset:
        raise LuksError(f"data offset {data_offset} leaves no room for a keyslot")
    digest_salt = os.urandom(32)
    digest = pbkdf2(digest_hash, key, digest_salt, digest_iterations,
                    _HASHES[digest_hash]().digest_size)
    if kdf.type == "pbkdf2":
        kdf_json: dict[str, Any] = {"type": "pbkdf2", "hash": kdf.hash,
                                    "iterations": kdf.iterations, "salt": _b64text(kdf.salt)}
    else:
        kdf_json = {"type": kdf.type, "time": kdf.iterations, "memory": kdf.memory,
                    "cpus": kdf.cpus, "salt": _b64text(kdf.salt)}
    metadata = {
        "keyslots": {"0": {
            "type": "luks2", "key_size": key_bytes,
            "af": {"type": "luks1", "stripes": STRIPES, "hash": digest_hash},
            "area": {"type": "raw", "offset": str(LUKS2_KEYSLOTS_OFFSET), "size": str(area_size),
                     "encryption": str(spec), "key_size": key_bytes},
            "kdf": kdf_json}},
        "tokens": {},
        "segments": {"0": {"type": "crypt", "offset": str(data_offset), "size": "dynamic",
                           "iv_tweak": "0", "encryption": str(spec), "sector_size": sector_size}},
        "digests": {"0": {"type": "pbkdf2", "keyslots": ["0"], "segments": ["0"],
                          "hash": digest_hash, "iterations": digest_iterations,
                          "salt": _b64text(digest_salt), "digest": _b64text(digest)}},
        "config": {"json_size": str(LUKS2_HEADER_SIZE - _LUKS2_BINARY),
                   "keyslots_size": str(data_offset - LUKS2_KEYSLOTS_OFFSET)},
    }
    uuid_text = str(uuid.uuid4())
    for offset in (0, LUKS2_HEADER_SIZE):
        write(offset, _luks2_binary(metadata, offset, 1, uuid_text, label))
    _write_keyslot(write, key, passphrase, kdf, spec, LUKS2_KEYSLOTS_OFFSET, digest_hash)
    volume = _luks2_volume(metadata)
    volume.uuid = uuid_text
    return volume


def hash_names() -> Sequence[str]:
    """The hash names PBKDF2 and the splitter accept here."""
    return tuple(_HASHES)
