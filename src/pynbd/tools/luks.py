"""pynbd luks — make LUKS1 and LUKS2 images, show their headers.

Usage:
    pynbd luks format IMAGE [--type luks1|luks2] [--size SIZE] [--cipher CIPHER]
                      [--key-size BITS] [--hash HASH] [--pbkdf pbkdf2|argon2i|argon2id]
                      [--iter-time MS] [--pbkdf-force-iterations N] [--pbkdf-memory KIB]
                      [--pbkdf-parallel N] [--sector-size BYTES] [--label TEXT]
                      [--passphrase SECRET|+FILE|-|-FD | --passphrase-env VAR]
    pynbd luks dump IMAGE

``format`` writes a new header with the passphrase in keyslot 0, as
``cryptsetup luksFormat`` does; the image works with ``cryptsetup``,
``qemu-img`` (LUKS1), nbdkit's luks filter (LUKS1) and ``pynbd serve
--filter=luks``. An existing IMAGE is formatted in place (its payload is
what follows the header); ``--size`` creates or resizes IMAGE so the payload
has SIZE bytes (K/M/G/T suffixes). The old contents become unreadable.

Defaults are cryptsetup's: LUKS2, aes-xts-plain64 with a 512-bit key,
sha256, argon2id with time cost 4, memory 1 GiB (at most half the
available memory) and up to 4 threads, or for PBKDF2 (LUKS1's only KDF) the
iterations that take ``--iter-time`` ms (2000) here. Sectors are 512 bytes
(LUKS2 accepts 4096). The passphrase is asked on the terminal unless
given; ``+FILE``, ``-FD`` and ``--passphrase-env`` work as for the luks
filter.

``dump`` prints what pynbd understands of an image's header: version,
cipher, sector size, payload offset and the keyslots.

Errors are one line on stderr, exit status 1.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import time

from ..backend.params import parse_size, read_secret
from ..formats.luks import (
    CipherSpec,
    Kdf,
    LuksError,
    Volume,
    format_luks1,
    format_luks2,
    hash_names,
    luks1_layout,
    pbkdf2,
    read_volume,
)

PROG = "pynbd luks"
MIN_DIGEST_ITERATIONS = 1000
ARGON2_TIME = 4
ARGON2_MEMORY = 1 << 20  # KiB


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Make LUKS images and show their headers.")
    sub = p.add_subparsers(dest="command", required=True)
    fmt = sub.add_parser("format", help="write a new LUKS header (keyslot 0)")
    fmt.add_argument("image")
    fmt.add_argument("--type", choices=("luks1", "luks2"), default="luks2")
    fmt.add_argument("--size", help="make the payload this size (creates IMAGE)")
    fmt.add_argument("--cipher", default="aes-xts-plain64")
    fmt.add_argument("--key-size", type=int, help="volume key bits (default 512 for xts, 256 for cbc)")
    fmt.add_argument("--hash", default="sha256", choices=hash_names())
    fmt.add_argument("--pbkdf", choices=("pbkdf2", "argon2i", "argon2id"))
    fmt.add_argument("--iter-time", type=int, default=2000, metavar="MS")
    fmt.add_argument("--pbkdf-force-iterations", type=int, metavar="N")
    fmt.add_argument("--pbkdf-memory", type=int, metavar="KIB")
    fmt.add_argument("--pbkdf-parallel", type=int, metavar="N")
    fmt.add_argument("--sector-size", type=int, default=512, choices=(512, 1024, 2048, 4096))
    fmt.add_argument("--label", default="")
    secret = fmt.add_mutually_exclusive_group()
    secret.add_argument("--passphrase", default="-", help="SECRET, +FILE, - or -FD")
    secret.add_argument("--passphrase-env", metavar="VAR")
    dump = sub.add_parser("dump", help="describe an image's LUKS header")
    dump.add_argument("image")
    return p


def _passphrase(args: argparse.Namespace) -> bytes:
    if args.passphrase_env is not None:
        text = os.environ.get(args.passphrase_env)
        if text is None:
            raise LuksError(f"environment variable {args.passphrase_env!r} is not set")
    else:
        try:
            text = read_secret(args.passphrase)
        except OSError as exc:
            raise LuksError(f"cannot read passphrase: {exc.filename or args.passphrase}: "
                            f"{exc.strerror or exc}") from None
    if not text:
        raise LuksError("the passphrase is empty")
    return text.encode("utf-8")


def _pbkdf2_iterations(hash_name: str, milliseconds: int) -> int:
    """The PBKDF2 iterations that take about ``milliseconds`` here."""
    trial = 20000
    start = time.perf_counter()
    pbkdf2(hash_name, b"benchmark", bytes(32), trial, 32)
    elapsed = max(time.perf_counter() - start, 1e-6)
    return max(MIN_DIGEST_ITERATIONS, int(trial * milliseconds / 1000 / elapsed))


def _argon2_memory() -> int:
    """cryptsetup's default argon2 memory, at most half the available memory (KiB)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            available = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return ARGON2_MEMORY
    return max(32, min(ARGON2_MEMORY, available // 2))


def _kdf(args: argparse.Namespace, kind: str) -> Kdf:
    salt = os.urandom(32)
    if kind == "pbkdf2":
        iterations = args.pbkdf_force_iterations or _pbkdf2_iterations(args.hash, args.iter_time)
        return Kdf("pbkdf2", salt, args.hash, iterations)
    return Kdf(kind, salt, iterations=args.pbkdf_force_iterations or ARGON2_TIME,
               memory=args.pbkdf_memory or _argon2_memory(),
               cpus=args.pbkdf_parallel or min(4, os.cpu_count() or 1))


def format_image(args: argparse.Namespace) -> Volume:
    name, sep, mode = args.cipher.partition("-")
    if not sep:
        raise LuksError(f"cipher {args.cipher!r} is not NAME-MODE (e.g. aes-xts-plain64)")
    spec = CipherSpec.parse(name, mode)
    bits = args.key_size or (512 if spec.mode == "xts" else 256)
    if bits % 8:
        raise LuksError(f"--key-size {bits} is not a whole number of bytes")
    spec.check_key(bits // 8)
    if args.type == "luks1":
        if args.pbkdf not in (None, "pbkdf2"):
            raise LuksError(f"LUKS1 keyslots use pbkdf2, not {args.pbkdf}")
        if args.sector_size != 512:
            raise LuksError("LUKS1 sectors are 512 bytes")
        data_offset = luks1_layout(bits // 8)[1] * 512
    else:
        data_offset = 16 << 20
    payload = None if args.size is None else parse_size(args.size)
    if payload is None:
        if not os.path.exists(args.image):
            raise LuksError(f"{args.image}: no such file (give --size to create it)")
        if os.path.getsize(args.image) <= data_offset and not _is_block_device(args.image):
            raise LuksError(f"{args.image}: too small for a LUKS header of "
                            f"{data_offset} bytes and a payload (give --size)")
    if payload is not None and payload % args.sector_size:
        raise LuksError(f"--size {payload} is not a multiple of the {args.sector_size}-byte sector")
    passphrase = _passphrase(args)
    kdf = _kdf(args, args.pbkdf or ("pbkdf2" if args.type == "luks1" else "argon2id"))
    digest_iterations = (MIN_DIGEST_ITERATIONS if args.pbkdf_force_iterations
                         else _pbkdf2_iterations(args.hash, args.iter_time // 8))
    fd = os.open(args.image, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if payload is not None:
            os.ftruncate(fd, data_offset + payload)

        def write(offset: int, data: bytes) -> None:
            os.pwrite(fd, data, offset)

        write(0, bytes(data_offset))  # no trace of an older header or keyslot
        if args.type == "luks1":
            volume = format_luks1(write, passphrase, spec, bits // 8, args.hash, kdf.iterations,
                                  digest_iterations)
        else:
            volume = format_luks2(write, passphrase, spec, bits // 8, kdf, args.hash,
                                  digest_iterations, args.sector_size, data_offset, args.label)
        os.fsync(fd)
    finally:
        os.close(fd)
    return volume


def _is_block_device(path: str) -> bool:
    return stat.S_ISBLK(os.stat(path).st_mode)


def dump_image(path: str) -> str:
    with open(path, "rb") as f:
        def read(offset: int, count: int) -> bytes:
            f.seek(offset)
            return f.read(count)
        volume = read_volume(read)
        size = os.fstat(f.fileno()).st_size
    lines = [f"version: LUKS{volume.version}", f"cipher: {volume.cipher}",
             f"key: {volume.key_bytes * 8} bits", f"sector size: {volume.sector_size}",
             f"payload offset: {volume.data_offset}", f"payload size: {volume.payload_size(size)}"]
    if volume.uuid:
        lines.append(f"uuid: {volume.uuid}")
    lines += [f"keyslot {s.index}: {s.kdf.describe()}, {s.stripes} stripes {s.af_hash}, "
              f"area {s.area_offset}" for s in volume.keyslots]
    lines += [f"keyslot {i}: unusable: {why}" for i, why in volume.unusable]
    lines += [f"note: {n}" for n in volume.notes]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "format":
            volume = format_image(args)
            print(f"{args.image}: LUKS{volume.version} {volume.cipher}, payload at "
                  f"{volume.data_offset} bytes")
        else:
            print(dump_image(args.image))
    except (LuksError, OSError) as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
        print(f"{PROG}: {where}{message}", file=sys.stderr)
        return 1
    return 0
