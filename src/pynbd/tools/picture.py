"""Pictures of a disk, drawn with Pillow: allocation maps and the pieces heat-maps share.

``AllocationPicture`` draws an export's extents (``pynbd info --map --png``)
as a square laid out along a Hilbert curve, a strip, a legend and a title:

- The square holds ``side × side`` cells (256 × 256 by default), each
  ``size / side²`` bytes of the disk, laid out along a Hilbert curve: offset
  0 is the top-left cell, the curve ends at the top-right, and offsets close
  on the disk are close in the picture, so a file system's groups, a
  partition or a written region show as compact blobs whatever the disk's
  size (a 10 MiB disk and a 1 TiB one both fill the square).
- The strip under it is the same disk left to right, for "where on the disk".
- A cell shows the most telling kind that touches it: in ``base:allocation``
  data over zero over hole, in a dirty bitmap dirty over clean; so 4 KiB of
  data on a 1 TiB disk is still one visible cell (the legend gives the exact
  share of each kind, in bytes and percent).

``HeatMap`` and ``HeatAnimation`` draw the accesses ``pynbd heatmap``
(``tools.heatmap``) reads from a log filter's file: time across and offset
down, or the same Hilbert square frame by frame.

``hilbert_point`` / ``hilbert_order`` map cells to the square; ``paint``
turns (offset, length, kind) runs into one byte per cell; ``Canvas`` draws
titles, legends and swatches. Every picture offers ``point(...)``: where an
offset (and a moment) lands in the image, so tests can check its colours.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from ..proto.constants import BASE_ALLOCATION

RGB = tuple[int, int, int]
Run = tuple[int, int, int]  # offset, length, kind

BACKGROUND: RGB = (255, 255, 255)
INK: RGB = (30, 30, 30)
FRAME: RGB = (120, 120, 120)
MARGIN = 16
FONT_SIZE = 13
LINE = 18
STRIP_HEIGHT = 24
SWATCH = 12
LEGEND_WIDTH = 480

# Colours people can tell apart (Okabe & Ito's palette, and greys for "nothing here").
DATA: RGB = (0, 114, 178)
ZERO: RGB = (240, 200, 60)
HOLE: RGB = (232, 232, 232)
DIRTY: RGB = (213, 94, 0)
OTHERS: tuple[RGB, ...] = ((0, 158, 115), (204, 121, 167), (86, 180, 233), (230, 159, 0),
                           (0, 0, 0), (150, 100, 60))

#: context -> kind -> (words, colour, rank); a higher rank wins a cell.
KNOWN: dict[str, dict[int, tuple[str, RGB, int]]] = {
    BASE_ALLOCATION: {0: ("data", DATA, 3), 2: ("zero", ZERO, 2), 1: ("hole", HOLE, 1),
                      3: ("hole,zero", HOLE, 0)},
    "qemu:dirty-bitmap:": {1: ("dirty", DIRTY, 1), 0: ("clean", HOLE, 0)},
    "qemu:allocation-depth": {1: ("local", DATA, 2), 0: ("absent", HOLE, 0)},
}


def kind_style(context: str, kind: int) -> tuple[str, RGB, int]:
    """How a kind of extent is named, coloured and ranked in ``context``."""
    key = "qemu:dirty-bitmap:" if context.startswith("qemu:dirty-bitmap:") else context
    known = KNOWN.get(key, {})
    if kind in known:
        return known[kind]
    if key == "qemu:allocation-depth":
        return f"backing depth {kind}", OTHERS[kind % len(OTHERS)], 1
    return f"type {kind}", OTHERS[kind % len(OTHERS)], kind


def percent(part: int, whole: int) -> str:
    """``12.5%``; a tiny non-zero share keeps one significant digit (``0.0004%``), never ``0.0%``."""
    value = 100.0 * part / whole
    return f"{value:.1f}%" if value >= 0.1 or value == 0 else f"{value:.1g}%"


def approx_size(n: float) -> str:
    """A size for people: ``3.2 MiB``, ``1 TiB``, ``512 B``."""
    unit = "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024:
            break
        n, unit = n / 1024, bigger
    return f"{n:.1f}".removesuffix(".0") + f" {unit}"


# ----------------------------------------------------------------- the curve

def hilbert_point(side: int, d: int) -> tuple[int, int]:
    """The (x, y) cell of position ``d`` along the Hilbert curve filling a ``side``² square."""
    x = y = 0
    s = 1
    while s < side:
        rx = 1 & (d >> 1)
        ry = 1 & (d ^ rx)
        if ry == 0:
            if rx == 1:
                x, y = s - 1 - x, s - 1 - y
            x, y = y, x
        x += s * rx
        y += s * ry
        d >>= 2
        s <<= 1
    return x, y


@functools.cache
def hilbert_order(side: int) -> tuple[int, ...]:
    """For each pixel of the square (row by row), its position along the curve."""
    if side < 1 or side & (side - 1):
        raise ValueError(f"the square's side must be a power of two, not {side}")
    order = [0] * (side * side)
    for d in range(side * side):
        x, y = hilbert_point(side, d)
        order[y * side + x] = d
    return tuple(order)


def cell_range(offset: int, length: int, size: int, cells: int) -> tuple[int, int]:
    """The cells [first, end) that bytes [offset, offset + length) touch."""
    first = offset * cells // size
    end = -(-(offset + length) * cells // size)
    return first, max(end, first + 1) if length > 0 else first


def paint(runs: Iterable[Run], size: int, cells: int, rank: dict[int, int],
          index: dict[int, int]) -> bytearray:
    """One byte per cell: ``index[kind]`` of the highest-``rank`` kind touching it (0: none)."""
    out = bytearray(cells)
    for offset, length, kind in sorted(runs, key=lambda run: rank[run[2]]):
        first, end = cell_range(offset, length, size, cells)
        out[first:end] = bytes([index[kind]]) * (end - first)
    return out


def square(cells: bytes | bytearray, side: int, palette: Sequence[RGB], scale: int) -> Image.Image:
    """Cells (in curve order) as a ``side * scale`` square image."""
    order = hilbert_order(side)
    pixels = bytes(map(cells.__getitem__, order))
    return strip(pixels, side, side, palette).resize((side * scale, side * scale), Image.Resampling.NEAREST)


def strip(cells: bytes | bytearray, width: int, height: int, palette: Sequence[RGB]) -> Image.Image:
    """Palette indexes, row by row (a single row is repeated ``height`` times), as an RGB image."""
    data = bytes(cells) if len(cells) == width * height else bytes(cells) * height
    img = Image.frombytes("P", (width, height), data)
    img.putpalette([channel for colour in palette for channel in colour])
    return img.convert("RGB")


# ---------------------------------------------------------------- drawing

@functools.cache
def font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=FONT_SIZE)


class Canvas:
    """A white image with a pen for text, swatches and frames."""

    def __init__(self, width: int, height: int) -> None:
        self.image = Image.new("RGB", (width, height), BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)

    def text(self, x: int, y: int, text: str, anchor: str = "la") -> None:
        self.draw.text((x, y), text, fill=INK, font=font(), anchor=anchor)

    def swatch(self, x: int, y: int, colour: RGB, label: str) -> None:
        self.draw.rectangle((x, y + 2, x + SWATCH, y + 2 + SWATCH), fill=colour, outline=FRAME)
        self.text(x + SWATCH + 6, y, label)

    def paste(self, img: Image.Image, x: int, y: int) -> None:
        self.image.paste(img, (x, y))
        self.draw.rectangle((x - 1, y - 1, x + img.width, y + img.height), outline=FRAME)


@dataclass(frozen=True)
class SquareLayout:
    """Where a disk of ``size`` bytes lies in a Hilbert square drawn at ``at``."""

    size: int
    side: int
    scale: int
    at: tuple[int, int]

    @property
    def edge(self) -> int:
        return self.side * self.scale

    def point(self, offset: int) -> tuple[int, int]:
        """The centre pixel of the cell holding ``offset``."""
        x, y = hilbert_point(self.side, offset * self.side * self.side // self.size)
        return (self.at[0] + x * self.scale + self.scale // 2,
                self.at[1] + y * self.scale + self.scale // 2)


@dataclass(frozen=True)
class Share:
    kind: int
    words: str
    colour: RGB
    length: int


class AllocationPicture:
    """An export's extent map as a picture; ``point(offset)`` finds an offset in it."""

    def __init__(self, size: int, runs: Sequence[Run], context: str = BASE_ALLOCATION,
                 title: str = "", side: int = 256, scale: int = 2) -> None:
        if size <= 0:
            raise ValueError("an empty export has no picture")
        self.size = size
        styles = {kind: kind_style(context, kind) for kind in sorted({run[2] for run in runs})}
        totals = dict.fromkeys(styles, 0)
        for _offset, length, kind in runs:
            totals[kind] += length
        self.shares = [Share(kind, words, colour, totals[kind])
                       for kind, (words, colour, _rank) in styles.items()]
        palette = [HOLE, *(share.colour for share in self.shares)]
        index = {share.kind: i for i, share in enumerate(self.shares, start=1)}
        rank = {kind: style[2] for kind, style in styles.items()}
        edge = side * scale
        self.layout = SquareLayout(size, side, scale, (MARGIN, MARGIN + 2 * LINE))
        self.strip_at = (MARGIN, MARGIN + 2 * LINE + edge + LINE)
        legend_y = self.strip_at[1] + STRIP_HEIGHT + LINE // 2
        canvas = Canvas(edge + 2 * MARGIN, legend_y + LINE * (len(self.shares) + 1) + MARGIN)
        canvas.text(MARGIN, MARGIN, title or context)
        canvas.text(MARGIN, MARGIN + LINE, f"{approx_size(size)} ({size} bytes), {context}; "
                                           f"a cell is {approx_size(size / side ** 2)}")
        canvas.paste(square(paint(runs, size, side * side, rank, index), side, palette, scale),
                     *self.layout.at)
        canvas.text(MARGIN, self.strip_at[1] - LINE + 2,
                    "offset 0 to the end (the square above: a Hilbert curve from top left to top right)")
        canvas.paste(strip(paint(runs, size, edge, rank, index), edge, STRIP_HEIGHT, palette),
                     *self.strip_at)
        for row, share in enumerate(self.shares):
            canvas.swatch(MARGIN, legend_y + row * LINE, share.colour,
                          f"{share.words}: {approx_size(share.length)}, "
                          f"{percent(share.length, size)}")
        self.image = canvas.image

    def point(self, offset: int) -> tuple[int, int]:
        """The centre pixel, in the image, of the square's cell holding ``offset``."""
        return self.layout.point(offset)

    def strip_point(self, offset: int) -> tuple[int, int]:
        """The pixel of the strip's column holding ``offset``."""
        column = offset * self.layout.edge // self.size
        return self.strip_at[0] + column, self.strip_at[1] + STRIP_HEIGHT // 2


# ---------------------------------------------------------------- heat-maps

ACCESS_READ, ACCESS_WRITE, ACCESS_ZERO = 0, 1, 2  # the kinds of access: a read, a write, a zero or trim
Touch = tuple[float, int, int, int]  # place on the time axis (0 to 1), kind, offset, count
READ_COLOUR = DATA
WRITE_COLOUR = DIRTY
ZERO_COLOUR: RGB = (0, 158, 115)
BOTH_COLOUR: RGB = (150, 60, 170)  # read and written
KIND_COLOURS = (READ_COLOUR, WRITE_COLOUR, ZERO_COLOUR)
KIND_WORDS = ("reads", "writes", "zeroes and trims")


def log_scale(count: int, most: int) -> float:
    """0 for nothing, then 0.25 to 1 logarithmically up to ``most`` (one access stays visible)."""
    if count <= 0:
        return 0.0
    return min(1.0, 0.25 + 0.75 * math.log1p(count) / math.log1p(max(most, 1)))


def heat_colour(counts: Sequence[int], most: int) -> RGB:
    """A touched cell's colour from its reads, writes and zeroes: the telling kind (read and
    written is "both"; a zero shows only where nothing was read or written), as strong as
    there were many accesses."""
    reads, writes, zeroes = counts
    colour = (BOTH_COLOUR if reads and writes else WRITE_COLOUR if writes else
              READ_COLOUR if reads else ZERO_COLOUR)
    strength = log_scale(reads + writes + zeroes, most)
    r, g, b = (round(255 + (channel - 255) * strength) for channel in colour)
    return r, g, b


def time_label(place: float, duration: float | None, requests: int) -> str:
    """A place on the time axis in seconds, or as a request number when ``duration`` is None."""
    if duration is None:
        return f"request {round(place * (requests - 1)) + 1}"
    return f"{duration * place:.3g} s"


def legend(touches: Sequence[Touch]) -> list[tuple[RGB, str]]:
    """Each kind's colour, number of requests and bytes, then the colour of "both"."""
    entries = []
    for kind, (colour, words) in enumerate(zip(KIND_COLOURS, KIND_WORDS, strict=True)):
        chosen = [t for t in touches if t[1] == kind]
        entries.append((colour, f"{words}: {len(chosen)}, {approx_size(sum(t[3] for t in chosen))}"))
    entries.append((BOTH_COLOUR, "read and written"))
    return entries


class HeatMap:
    """Time across, offset down (0 at the top); ``point`` finds a moment and an offset in it."""

    def __init__(self, touches: Sequence[Touch], size: int, duration: float | None, title: str = "",
                 width: int = 400, height: int = 256, scale: int = 2) -> None:
        self.size, self.width, self.height, self.scale = size, width, height, scale
        self.origin = (MARGIN + 72, MARGIN + 2 * LINE)
        counts: dict[int, list[int]] = {}  # cell -> [reads, writes, zeroes]
        for place, kind, offset, count in touches:
            column = min(int(place * width), width - 1)
            first, end = cell_range(offset, count, size, height)
            for cell in range(first * width + column, min(end, height) * width, width):
                counts.setdefault(cell, [0, 0, 0])[kind] += 1
        most = max((sum(c) for c in counts.values()), default=1)
        pixels = bytearray(BACKGROUND) * (width * height)
        for cell, numbers in counts.items():
            pixels[cell * 3:cell * 3 + 3] = bytes(heat_colour(numbers, most))
        plot = Image.frombytes("RGB", (width, height), bytes(pixels))
        x0, y0 = self.origin
        width, height = width * scale, height * scale
        room = max(width, LEGEND_WIDTH)  # a narrow plot still has room for its legend
        canvas = Canvas(x0 + room + 2 * MARGIN, y0 + height + 4 * LINE + MARGIN)
        canvas.text(MARGIN, MARGIN, f"{title}{': ' if title else ''}a disk of {approx_size(size)}, "
                                    f"{len(touches)} requests" + ("" if duration is None else
                                                                 f" over {duration:.3g} s"))
        canvas.text(MARGIN, MARGIN + LINE, "offset down, time across")
        canvas.paste(plot.resize((width, height), Image.Resampling.NEAREST), x0, y0)
        for tick in range(5):
            y = y0 + tick * (height - 1) // 4
            canvas.draw.line((x0 - 6, y, x0 - 2, y), fill=FRAME)
            canvas.text(x0 - 8, y, approx_size(size * tick / 4), anchor="rm")
            x = x0 + tick * (width - 1) // 4
            canvas.draw.line((x, y0 + height + 1, x, y0 + height + 5), fill=FRAME)
            canvas.text(x, y0 + height + 6, time_label(tick / 4, duration, len(touches)),
                        anchor="ra" if tick == 4 else "ma")
        for n, (colour, label) in enumerate(legend(touches)):
            canvas.swatch(x0 + (n % 2) * room // 2, y0 + height + LINE + 10 + (n // 2) * LINE, colour, label)
        self.image = canvas.image

    def point(self, place: float, offset: int) -> tuple[int, int]:
        """The centre pixel of the cell for a place on the time axis (0 to 1) and an offset."""
        column = min(int(place * self.width), self.width - 1)
        row = offset * self.height // self.size
        return (self.origin[0] + column * self.scale + self.scale // 2,
                self.origin[1] + row * self.scale + self.scale // 2)


# Cell states in an animation frame: untouched; last read / written / zeroed in
# an earlier frame; read / written / both / zeroed in this one.
UNTOUCHED, PAST = 0, (1, 2, 3)
NOW_READ, NOW_WRITE, NOW_BOTH, NOW_ZERO = 4, 5, 6, 7


def _now_table(kind: int) -> bytes:
    """How a cell's state changes when this frame touches it with ``kind`` (for bytes.translate)."""
    table = list(range(256))
    for state in (UNTOUCHED, *PAST):
        table[state] = (NOW_READ, NOW_WRITE, NOW_ZERO)[kind]
    if kind == ACCESS_READ:
        table[NOW_WRITE] = table[NOW_BOTH] = NOW_BOTH
        table[NOW_ZERO] = NOW_READ
    elif kind == ACCESS_WRITE:
        table[NOW_READ] = table[NOW_BOTH] = NOW_BOTH
        table[NOW_ZERO] = NOW_WRITE
    return bytes(table)


_NOW = tuple(_now_table(kind) for kind in (ACCESS_READ, ACCESS_WRITE, ACCESS_ZERO))


def _pale(colour: RGB) -> RGB:
    r, g, b = colour
    return (r + 3 * 255) // 4, (g + 3 * 255) // 4, (b + 3 * 255) // 4


class HeatAnimation:
    """Frames of the disk as a Hilbert square, each showing one slice of time."""

    def __init__(self, touches: Sequence[Touch], size: int, duration: float | None, title: str = "",
                 frames: int = 48, side: int = 128, scale: int = 4) -> None:
        self.layout = SquareLayout(size, side, scale, (MARGIN, MARGIN + 2 * LINE))
        palette = [HOLE, *map(_pale, KIND_COLOURS), READ_COLOUR, WRITE_COLOUR, BOTH_COLOUR, ZERO_COLOUR]
        ordered = sorted(touches, key=lambda t: t[0])
        places = [t[0] for t in ordered]
        history = bytearray(side * side)
        edge = self.layout.edge
        self.frames: list[Image.Image] = []
        for frame in range(frames):
            low = bisect.bisect_left(places, frame / frames)
            high = len(places) if frame == frames - 1 else bisect.bisect_left(places, (frame + 1) / frames)
            now = bytearray(history)
            numbers = [0, 0, 0]
            for _place, kind, offset, count in ordered[low:high]:
                first, end = cell_range(offset, count, size, side * side)
                now[first:end] = now[first:end].translate(_NOW[kind])
                history[first:end] = bytes([PAST[kind]]) * (end - first)
                numbers[kind] += 1
            canvas = Canvas(edge + 2 * MARGIN, self.layout.at[1] + edge + 4 * LINE + MARGIN)
            canvas.text(MARGIN, MARGIN, f"{title}{': ' if title else ''}{approx_size(size)}, frame "
                                        f"{frame + 1}/{frames}")
            canvas.text(MARGIN, MARGIN + LINE,
                        f"{time_label(frame / frames, duration, len(places))} to "
                        f"{time_label((frame + 1) / frames, duration, len(places))}: "
                        + ", ".join(f"{n} {w}" for n, w in zip(numbers, KIND_WORDS, strict=True)))
            canvas.paste(square(now, side, palette, scale), *self.layout.at)
            legend_y = self.layout.at[1] + edge + 8
            for n, (colour, label) in enumerate(((READ_COLOUR, "read"), (WRITE_COLOUR, "written"),
                                                 (ZERO_COLOUR, "zeroed or trimmed"),
                                                 (BOTH_COLOUR, "read and written"))):
                canvas.swatch(MARGIN + (n % 2) * edge // 2, legend_y + (n // 2) * LINE, colour, label)
            canvas.text(MARGIN, legend_y + 2 * LINE, "pale: the last access in an earlier frame")
            self.frames.append(canvas.image)

    def save(self, path: str, image_format: str = "GIF", frame_ms: int = 120) -> None:
        """An animation that loops: ``image_format`` "GIF", or "PNG" for an animated PNG."""
        self.frames[0].save(path, format=image_format, save_all=True, append_images=self.frames[1:],
                            duration=frame_ms, loop=0)
