"""Test images for the xz, gzip and zstd tests: mixed data, compressed with the real tools.

    from compressed_images import mixed_image, compress

    data = mixed_image(4 << 20)                  # random, text and zero runs, reproducible
    path = compress(tmp_path, data, "gzip")      # runs gzip; also "xz", "xz-blocks", "zstd"
"""

from __future__ import annotations

import random

from nbdtest import run


def mixed_image(size: int, seed: int = 12) -> bytes:
    """Runs of random bytes, text and zeroes (compressible, but not trivially)."""
    rng = random.Random(seed)
    parts = []
    total = 0
    while total < size:
        kind = rng.randrange(3)
        length = rng.randrange(4096, 200_000)
        if kind == 0:
            piece = rng.randbytes(length)
        elif kind == 1:
            piece = (b"line %d of the test image\n" % rng.randrange(10**6) * (length // 20))[:length]
        else:
            piece = bytes(length)
        parts.append(piece)
        total += len(piece)
    return b"".join(parts)[:size]


COMMANDS = {
    "gzip": (["gzip", "-c"], ".gz"),
    "xz": (["xz", "-c", "-T1"], ".xz"),
    "xz-blocks": (["xz", "-c", "--block-size=1MiB", "-T1"], ".xz"),
    "xz-threads": (["xz", "-c", "--block-size=1MiB", "-T0"], ".xz"),
    "zstd": (["zstd", "-q", "-c"], ".zst"),
}


def compress(tmp_path, data: bytes, how: str, name: str = "disk") -> str:
    """Write ``data`` compressed by a real tool to tmp_path; the file's path."""
    cmd, suffix = COMMANDS[how]
    path = str(tmp_path / f"{name}{suffix}")
    with open(path, "wb") as f:
        f.write(run(cmd, input=data).stdout)
    return path
