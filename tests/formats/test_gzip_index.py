"""formats.gzip_index, formats.gzip_stored and formats.crc32: restart points, layouts, CRC combining."""

from __future__ import annotations

import random
import zlib

import pytest

from filters.compressed_images import mixed_image
from nbdtest import run
from pynbd.formats.crc32 import CrcTree, crc32_combine
from pynbd.formats.gzip_index import GzipIndex, SpanDecoder, build_index, identity_of
from pynbd.formats.gzip_stored import BLOCK, StoredGzip, create, open_layout, parse_ranges

MiB = 1 << 20
DATA = mixed_image(8 * MiB, seed=30)


class Counting:
    """A read callable over bytes that counts what it was asked for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.asked = 0

    def __call__(self, offset: int, count: int) -> bytes:
        self.asked += count
        return self.data[offset:offset + count]


def read_span(read, index, i: int, file_size: int) -> bytes:
    """The whole span from point i, decoded 10000 bytes at a time."""
    decoder = SpanDecoder(read, index, i, file_size)
    out = bytearray(index.span_end(i) - index.points[i].out)
    done = 0
    while done < len(out):
        done += decoder.step(memoryview(out)[done:done + 10000])
    return bytes(out)


def test_crc32_combine_matches_zlib():
    rng = random.Random(1)
    for la, lb in [(0, 0), (0, 7), (7, 0), (1, 1), (100, 3), (12345, 70000), (5, 1 << 20)]:
        a, b = rng.randbytes(la), rng.randbytes(lb)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), lb) == zlib.crc32(a + b)


def test_crc_tree_follows_updates():
    rng = random.Random(2)
    pieces = [rng.randbytes(rng.randrange(0, 5000)) for _ in range(37)]
    tree = CrcTree([(zlib.crc32(p), len(p)) for p in pieces])
    assert tree.crc == zlib.crc32(b"".join(pieces)) and tree.length == sum(map(len, pieces))
    for _ in range(20):
        i = rng.randrange(len(pieces))
        pieces[i] = rng.randbytes(len(pieces[i]))
        tree.update(i, zlib.crc32(pieces[i]))
        assert tree.crc == zlib.crc32(b"".join(pieces))


@pytest.mark.parametrize("level", ["-1", "-9"])
def test_points_and_spans(level):
    gz = run(["gzip", level, "-c"], input=DATA).stdout
    read = Counting(gz)
    index = build_index(read, len(gz), span=MiB)
    assert index.size == len(DATA) and len(index.points) >= 6
    assert any(p.bits for p in index.points)  # restart points in the middle of a byte work too
    for i, p in enumerate(index.points):
        assert read_span(read, index, i, len(gz)) == DATA[p.out:index.span_end(i)]
    read.asked = 0
    last = len(index.points) - 1
    read_span(read, index, last, len(gz))
    assert read.asked < len(gz) // 3  # the last MiB costs a fraction of the whole file


def test_index_file_belongs_to_its_gzip_file(tmp_path):
    gz = run(["gzip", "-c"], input=DATA).stdout
    read = Counting(gz)
    index = build_index(read, len(gz))
    path = str(tmp_path / "idx")
    index.save(path, identity_of(read, len(gz)))
    loaded = GzipIndex.load(path, identity_of(read, len(gz)))
    assert loaded is not None and loaded.points == index.points and loaded.size == index.size
    other = run(["gzip", "-c"], input=DATA[::-1]).stdout
    assert GzipIndex.load(path, identity_of(Counting(other), len(other))) is None
    with open(path, "r+b") as f:
        f.truncate(100)
    assert GzipIndex.load(path, identity_of(read, len(gz))) is None


def make_stored(ranges: str) -> tuple[bytearray, list]:
    out = bytearray()

    def write(offset: int, piece: bytes) -> None:
        out.extend(bytes(max(0, offset - len(out))))
        out[offset:offset + len(piece)] = piece
    segments = create(Counting(DATA), len(DATA), write, parse_ranges(ranges, len(DATA)))
    return out, segments


def test_stored_layout_segments_decode_on_their_own():
    out, segments = make_stored("1M-2M,3M-3584K")
    assert zlib.decompress(bytes(out), 31) == DATA
    read = Counting(bytes(out))
    layout = open_layout(read, len(out))
    assert layout == segments
    for seg in segments:  # no segment refers back into another: each decodes with no history
        chunk = bytes(out[seg.file:seg.file + seg.file_length])
        assert zlib.decompressobj(-15).decompress(chunk) == DATA[seg.out:seg.out + seg.length]
        if seg.stored:
            assert seg.file_length == seg.length + 5 * -(-seg.length // BLOCK)
    g = StoredGzip(read, len(out), layout)
    assert g.trailer_is_current(read) and g.ranges() == "1048576-2097152, 3145728-3670016"
    assert g.stored_pieces(MiB - 512, 1024) is None and g.stored_pieces(0, 1) is None
    pieces = list(g.stored_pieces(MiB + BLOCK - 100, 300))
    assert [(p[1], p[4]) for p in pieces] == [(MiB, 100), (MiB + BLOCK, 200)]


def test_plain_gzip_has_no_layout():
    gz = run(["gzip", "-c"], input=DATA[:MiB]).stdout
    assert open_layout(Counting(gz), len(gz)) is None


@pytest.mark.parametrize(("text", "words"), [
    ("1M-2M,1536K-3M", "overlap"), ("1M-2M,1M-2M", "overlap"), ("100-1024", "multiples of 512"),
    ("0-9M", "past the end"), ("2M-2M", "larger than START"), ("a-b", "could not parse"),
])
def test_bad_ranges(text, words):
    with pytest.raises(ValueError, match=words):
        parse_ranges(text, len(DATA))


def test_range_may_end_at_an_unaligned_end():
    assert parse_ranges("512-1001", 1001) == [(512, 1001)]
