"""Drawing helpers for the PNGs that explain a result (`semclip show`, `tie show`): one colour map
with its scale, small images enlarged, captions that wrap, and a test for a map with nothing to show.

PIL only (no matplotlib): a heat map is a greyscale image coloured blue (low) - yellow - red (high).
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont, ImageOps

LOW, MID, HIGH = "#1030c0", "#f0e020", "#e01010"
MIN_SIDE = 256  # smaller images are enlarged (nearest neighbour, a whole factor) to at least this
INK, NOTE = (20, 20, 20), (190, 0, 0)


def font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow < 10.1 or no FreeType: PIL's fixed bitmap font
        return ImageFont.load_default()


def enlarge(image: Image.Image, min_side: int = MIN_SIDE) -> tuple[Image.Image, int]:
    """(image, factor): `image` scaled up by a whole factor (pixels stay sharp) until its shorter side
    is at least `min_side`; factor 1 (the image itself) when it already is."""
    factor = max(1, math.ceil(min_side / max(1, min(image.size))))
    if factor == 1:
        return image, 1
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST), factor


def colourize(grey: Image.Image) -> Image.Image:
    """A greyscale ("L") image in the colour map: 0 blue, 128 yellow, 255 red."""
    return ImageOps.colorize(grey, black=LOW, mid=MID, white=HIGH)


def is_flat(values, rel: float = 1e-6) -> bool:
    """True when the values (numbers, or anything with .tolist()) are all the same, up to `rel`."""
    flat = values.flatten().tolist() if hasattr(values, "flatten") else list(values)
    lo, hi = min(flat), max(flat)
    return hi - lo <= rel * max(1.0, abs(hi), abs(lo))


def wrap_text(text: str, width: int, face) -> list[str]:
    """`text` broken into lines no wider than `width` pixels, at spaces (a longer word stays whole)."""
    draw, lines = ImageDraw.Draw(Image.new("RGB", (1, 1))), []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}" if line else word
            if line and draw.textlength(trial, font=face) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def caption(text: str, width: int, *, size: int = 14, fill=INK) -> Image.Image:
    """A white strip `width` wide holding `text`, wrapped."""
    face = font(size)
    lines = wrap_text(text, width - 8, face)
    strip = Image.new("RGB", (width, 6 + len(lines) * (size + 4)), "white")
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((4, 3 + i * (size + 4)), line, fill=fill, font=face)
    return strip


def colour_bar(width: int, lo: float, hi: float, label: str, *, size: int = 12) -> Image.Image:
    """The colour scale: its label (wrapped), a gradient from `lo` (left) to `hi` (right), the end values."""
    face, bar_h, margin, step = font(size), 12, 4, size + 4
    lines = wrap_text(label, width - 2 * margin, face)
    top = 2 + len(lines) * step
    strip = Image.new("RGB", (width, top + bar_h + step + 6), "white")
    gradient = Image.linear_gradient("L").rotate(90, expand=True)  # 0 on the left, 255 on the right
    strip.paste(colourize(gradient.resize((width - 2 * margin, bar_h))), (margin, top))
    draw = ImageDraw.Draw(strip)
    for i, line in enumerate(lines):
        draw.text((margin, 2 + i * step), line, fill=INK, font=face)
    low, high = f"{lo:.4g}", f"{hi:.4g}"
    draw.text((margin, top + bar_h + 2), low, fill=INK, font=face)
    draw.text((width - margin - draw.textlength(high, font=face), top + bar_h + 2), high, fill=INK, font=face)
    return strip


def stack(*parts: Image.Image) -> Image.Image:
    """The parts one below the other on white, left-aligned."""
    parts = [p for p in parts if p is not None]
    sheet = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
    y = 0
    for part in parts:
        sheet.paste(part, (0, y))
        y += part.height
    return sheet
