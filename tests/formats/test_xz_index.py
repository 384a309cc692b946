"""formats.xz: the block index read from the end agrees with ``xz --robot --list``."""

from __future__ import annotations

import pytest

from filters.compressed_images import compress, mixed_image
from filters.stack_helpers import tmpfile
from nbdtest import run
from pynbd.formats.xz import BlockDecoder, XzError, read_index

DATA = mixed_image(3 << 20, seed=4)


def decode_block(read, block) -> bytes:
    decoder = BlockDecoder(read, block)
    out = bytearray(block.size)
    done = 0
    while done < len(out):
        done += decoder.step(memoryview(out)[done:done + 65536])
    return bytes(out)


def reader(path: str):
    data = open(path, "rb").read()
    return (lambda offset, count: data[offset:offset + count]), len(data)


@pytest.mark.parametrize("how", ["xz", "xz-blocks", "xz-threads"])
def test_blocks_match_xz_list(tmp_path, how):
    path = compress(tmp_path, DATA, how)
    listing = run(["xz", "--robot", "--list", "-vv", path]).stdout.decode().splitlines()
    blocks = [line.split("\t") for line in listing if line.startswith("block\t")]
    read, size = reader(path)
    index = read_index(read, size)
    assert [(b.file, b.out, b.size) for b in index.blocks] == \
        [(int(f[4]), int(f[5]), int(f[7])) for f in blocks]
    assert b"".join(decode_block(read, b) for b in index.blocks) == DATA


def test_damaged_check_is_an_error(tmp_path):
    data = bytearray(open(compress(tmp_path, DATA, "xz-blocks"), "rb").read())

    def read(offset: int, count: int) -> bytes:
        return bytes(data[offset:offset + count])
    block = read_index(read, len(data)).blocks[1]
    data[block.file + block.unpadded - 3] ^= 1  # inside the block's CRC-64
    with pytest.raises(XzError, match="damaged xz block"):
        decode_block(read, block)


def test_truncated_anywhere_is_an_error(tmp_path):
    good = open(compress(tmp_path, DATA, "xz-blocks"), "rb").read()
    for cut in (1, 12, 100, len(good) // 2, len(good) - 13, len(good) - 1):
        read, size = reader(tmpfile(tmp_path, "t.xz", good[:cut]))
        with pytest.raises(XzError):
            read_index(read, size)
