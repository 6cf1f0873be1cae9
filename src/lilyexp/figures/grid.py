"""The image grid of the paper's Fig. 2 (subject-driven generation): the subject's real reference photo first,
then one row per method (e.g. Lily, LoRA) of its samples for the same prompts and seeds, one column per prompt,
labelled with the method names and abbreviated prompts. Saved as PNG.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from lilyexp.errors import ConfigError

BACKGROUND, INK = (255, 255, 255), (0, 0, 0)


def abbreviate(prompts: Sequence[str], max_chars: int = 40) -> list[str]:
    """Column labels: the words every prompt starts with dropped ("A picture of a"), the rest cut to ``max_chars``."""
    words = [prompt.split() for prompt in prompts]
    shared = 0
    while len(prompts) > 1 and all(len(w) > shared + 1 for w in words) and len({w[shared] for w in words}) == 1:
        shared += 1
    labels = [" ".join(w[shared:]) for w in words]
    return [label if len(label) <= max_chars else label[:max_chars - 1].rstrip() + "…" for label in labels]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], text: str, font: ImageFont.ImageFont,
          chars_per_line: int) -> None:
    """``text`` wrapped and centred in ``box`` (left, top, right, bottom)."""
    body = "\n".join(textwrap.wrap(text, chars_per_line) or [""])
    left, top, right, bottom = draw.multiline_textbbox((0, 0), body, font=font, align="center")
    x = box[0] + (box[2] - box[0] - (right - left)) // 2 - left
    y = box[1] + (box[3] - box[1] - (bottom - top)) // 2 - top
    draw.multiline_text((x, y), body, fill=INK, font=font, align="center")


def _check_rows(rows: Mapping[str, Sequence[Image.Image]], prompts: Sequence[str]) -> None:
    if not rows:
        raise ConfigError("the grid needs at least one method row.")
    for method, images in rows.items():
        if len(images) != len(prompts):
            raise ConfigError(f"grid row '{method}' has {len(images)} images for {len(prompts)} prompts.")


def make_grid(reference: Image.Image, rows: Mapping[str, Sequence[Image.Image]], prompts: Sequence[str],
              cell: int = 256, label_width: int | None = None, header: int | None = None,
              caption: str = "") -> Image.Image:
    """Fig. 2's layout. Columns: method label, reference photo, one per prompt (header: abbreviated prompt).
    Rows: one per method, in ``rows`` order, its images in ``prompts`` order. The reference sits in the first row.
    ``caption``, when given, is a line under the grid (what ran: backbone, steps, seeds, metric models)."""
    _check_rows(rows, prompts)
    label_width = label_width or cell // 2
    header = header or max(cell // 4, 28)
    size = max(11, cell // 14)
    font, chars = _font(size), max(8, int(cell / (0.55 * size)))  # ~0.55 em per character
    width, footer = label_width + cell * (len(prompts) + 1), header if caption else 0
    grid = Image.new("RGB", (width, header + cell * len(rows) + footer), BACKGROUND)
    draw = ImageDraw.Draw(grid)
    if caption:
        _text(draw, (0, header + cell * len(rows), width, header + cell * len(rows) + footer), caption, font,
              int(width / (0.55 * size)))
    _text(draw, (label_width, 0, label_width + cell, header), "reference", font, chars)
    grid.paste(reference.convert("RGB").resize((cell, cell), Image.Resampling.BICUBIC), (label_width, header))
    for column, label in enumerate(abbreviate(prompts), start=1):
        left = label_width + column * cell
        _text(draw, (left, 0, left + cell, header), label, font, chars)
    for row, (method, images) in enumerate(rows.items()):
        top = header + row * cell
        _text(draw, (0, top, label_width, top + cell), method, font, max(6, int(label_width / (0.55 * size))))
        for column, image in enumerate(images, start=1):
            grid.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.BICUBIC),
                       (label_width + column * cell, top))
    return grid


def save_grid(grid: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp.png")
    grid.save(temporary, format="PNG")
    os.replace(temporary, path)  # never a half-written figure under the final name
    return path
