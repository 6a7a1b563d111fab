"""Labelled image grids: one PNG per task, for people to look at.

A task's grid reads left to right: the reference | the baseline edit | the text-to-image baseline |
each intervention. Every panel has a label above it and an optional caption below (e.g. a metric);
a missing image is drawn as an empty grey panel marked "n/a". Small images (a tiny model's 32 x 32
outputs) are enlarged with nearest-neighbour sampling so their pixels stay visible; large ones are
reduced with a Lanczos filter. Text uses PIL's default font.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
MISSING = (225, 225, 225)
OUTLINE = (200, 200, 200)  # a hairline around each image, so light images stand off the page
INK = (20, 20, 20)
MUTED = (90, 90, 90)
PAD = 8


@dataclasses.dataclass(frozen=True)
class Panel:
    """One image of a grid: a label above, the image (None if missing), a caption below."""

    label: str
    image: Image.Image | np.ndarray | None
    caption: str = ""


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy word wrap to `width` pixels; a word longer than the width is cut into pieces."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if draw.textlength(candidate, font=font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            while draw.textlength(word, font=font) > width and len(word) > 1:
                cut = len(word) - 1
                while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _fit(image: Image.Image | np.ndarray, cell: int) -> Image.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"grid images must be uint8 arrays or PIL images, got dtype {image.dtype}")
        image = Image.fromarray(image)
    image = image.convert("RGB")
    scale = cell / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    if scale >= 1:
        return image.resize(size, Image.Resampling.NEAREST)
    return image.resize(size, Image.Resampling.LANCZOS)


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Hg")
    return bottom + 3


def grid(rows: Sequence[Sequence[Panel]], *, title: str = "", cell: int = 256,
         row_labels: Sequence[str] | None = None) -> Image.Image:
    """Panels laid out in rows (rows may differ in length), each image fitted into cell x cell."""
    if not rows or not any(rows):
        raise ValueError("a grid needs at least one panel")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    label_font, caption_font, title_font = _font(14), _font(12), _font(16)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    gutter = 0 if row_labels is None else cell // 2
    n_cols = max(len(r) for r in rows)
    width = gutter + n_cols * (cell + PAD) + PAD

    def wrapped(text, font):
        return _wrap(text, font, cell, scratch) if text else []

    title_lines = _wrap(title, title_font, width - 2 * PAD, scratch) if title else []
    title_h = len(title_lines) * _line_height(title_font) + (PAD if title_lines else 0)
    heights = []
    for row in rows:
        label_h = max(len(wrapped(p.label, label_font)) for p in row) * _line_height(label_font)
        caption_h = max(len(wrapped(p.caption, caption_font)) for p in row) * _line_height(caption_font)
        heights.append((label_h, caption_h))
    height = PAD + title_h + sum(lh + cell + ch + 2 * PAD for lh, ch in heights)

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = PAD
    for line in title_lines:
        draw.text((PAD, y), line, font=title_font, fill=INK)
        y += _line_height(title_font)
    y += PAD if title_lines else 0
    for r, (row, (label_h, caption_h)) in enumerate(zip(rows, heights)):
        if row_labels is not None:
            for i, line in enumerate(_wrap(row_labels[r], label_font, gutter - PAD, scratch)):
                draw.text((PAD, y + label_h + cell // 2 + i * _line_height(label_font)), line, font=label_font,
                          fill=INK)
        for c, panel in enumerate(row):
            x = gutter + PAD + c * (cell + PAD)
            for i, line in enumerate(wrapped(panel.label, label_font)):
                draw.text((x, y + i * _line_height(label_font)), line, font=label_font, fill=INK)
            top = y + label_h
            if panel.image is None:
                draw.rectangle((x, top, x + cell - 1, top + cell - 1), fill=MISSING)
                draw.text((x + cell // 2, top + cell // 2), "n/a", font=label_font, fill=MUTED, anchor="mm")
            else:
                fitted = _fit(panel.image, cell)
                left, upper = x + (cell - fitted.width) // 2, top + (cell - fitted.height) // 2
                canvas.paste(fitted, (left, upper))
                draw.rectangle((left - 1, upper - 1, left + fitted.width, upper + fitted.height), outline=OUTLINE)
            for i, line in enumerate(wrapped(panel.caption, caption_font)):
                draw.text((x, top + cell + 2 + i * _line_height(caption_font)), line, font=caption_font, fill=MUTED)
        y += label_h + cell + caption_h + 2 * PAD
    return canvas

