"""The benchmark's PNG, drawn with PIL: accuracy per method with error bars, and example canvases
with the target (green), SemClip's scorer crop (orange) and the oracle's crop (blue)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

BAR, CONTROL, ERR, CHANCE = (70, 110, 190), (170, 170, 170), (20, 20, 20), (200, 30, 30)
BOXES = {"target": (0, 160, 0), "scorer": (240, 140, 0), "oracle": (40, 90, 230)}
LEGEND = [(BAR, "method (its text input is the question)"),
          (CONTROL, "control: the same adapter, its text input a constant string"),
          (CHANCE, "chance: one answer of the closed vocabulary at random")]


def _font(size: int):
    try:
        return ImageFont.load_default(size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def row_text(r: dict) -> str:
    """What a bar says after its end: the accuracy and, for crop methods, how often the crop held the target."""
    text = f"{r['accuracy_mean']:.1%}"
    if "target_in_crop" in r:
        text += f"  (target in crop {r['target_in_crop']:.0%})"
    return text


def bars(summary: dict, *, width: int = 900, row: int = 26, title: str = "",
         chance: float | None = None) -> Image.Image:
    """Horizontal bars: mean accuracy, with a whisker of ± one std over seeds; a dashed line at
    `chance`; after each bar its accuracy (and target-in-crop rate); a legend underneath."""
    font, left, right = _font(14), 190, 190
    legend = [(c, t) for c, t in LEGEND if c != CHANCE or chance is not None]
    axis = 40 + row * len(summary) + 6
    height = axis + 24 + 20 * len(legend) + 8
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), f"accuracy on held-out samples (mean ± std) {title}", fill=ERR, font=font)
    span = width - left - right
    x = lambda v: left + span * max(0.0, min(1.0, v))
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        draw.line((x(tick), 34, x(tick), axis), fill=(225, 225, 225))
        draw.text((x(tick) - 10, axis + 4), f"{tick:.0%}", fill=ERR, font=font)
    for i, (method, r) in enumerate(summary.items()):
        y = 40 + i * row
        mean, std = r["accuracy_mean"], r["accuracy_std"]
        draw.text((10, y + 4), method, fill=ERR, font=font)
        draw.rectangle((x(0), y + 4, x(mean), y + row - 4), fill=CONTROL if method.endswith("control") else BAR)
        mid = y + row // 2
        draw.line((x(mean - std), mid, x(mean + std), mid), fill=ERR, width=2)
        for end in (mean - std, mean + std):
            draw.line((x(end), mid - 5, x(end), mid + 5), fill=ERR, width=2)
        draw.text((x(mean + std) + 6, y + 4), row_text(r), fill=ERR, font=font)
    if chance is not None:
        for y in range(34, axis, 8):  # dashed, over the bars
            draw.line((x(chance), y, x(chance), min(y + 4, axis)), fill=CHANCE, width=2)
        draw.text((x(chance) + 4, 20), f"chance {chance:.0%}", fill=CHANCE, font=font)
    for i, (colour, text) in enumerate(legend):
        y = axis + 24 + 20 * i
        if colour == CHANCE:
            draw.line((12, y + 8, 30, y + 8), fill=CHANCE, width=2)
        else:
            draw.rectangle((12, y + 3, 30, y + 13), fill=colour)
        draw.text((38, y), text, fill=ERR, font=font)
    return image


def example(e: dict, *, size: int = 290) -> Image.Image:
    """One canvas with its boxes, and its question and answer underneath."""
    canvas = e["image"].convert("RGB")
    scale = size / canvas.width
    tile = Image.new("RGB", (size, size + 40), "white")
    tile.paste(canvas.resize((size, round(canvas.height * scale)), Image.Resampling.NEAREST), (0, 0))
    draw = ImageDraw.Draw(tile)
    for key, colour in BOXES.items():
        if e.get(key):
            draw.rectangle(tuple(round(v * scale) for v in e[key]), outline=colour, width=2)
    font = _font(12)
    draw.text((4, size + 4), e["question"], fill=ERR, font=font)
    draw.text((4, size + 20), f"answer: {e['answer']}", fill=ERR, font=font)
    return tile


def curves(summary: dict, *, panel: int = 220) -> Image.Image | None:
    """Each trained method's learning curve (blue) beside its control's (grey), one panel a pair, on a
    shared loss axis: a method that uses the text should end below its control."""
    pairs = [m for m in summary if "curve" in summary[m] and not m.endswith("-control")]
    if not pairs:
        return None
    font, pad = _font(12), 30
    values = [v for m in summary if "curve" in summary[m] for _, v in summary[m]["curve"]]
    top, low = max(values), min(values)
    image = Image.new("RGB", (len(pairs) * (panel + pad) + pad, panel + 60), "white")
    draw = ImageDraw.Draw(image)
    for i, method in enumerate(pairs):
        x0 = pad + i * (panel + pad)
        draw.rectangle((x0, 24, x0 + panel, 24 + panel), outline=(200, 200, 200))
        draw.text((x0, 6), f"{method}: training loss", fill=ERR, font=font)
        for name, colour in ((f"{method}-control", CONTROL), (method, BAR)):
            points = summary.get(name, {}).get("curve") or []
            last = max((s for s, _ in points), default=1)
            xy = [(x0 + panel * s / last, 24 + panel * (top - v) / max(top - low, 1e-9)) for s, v in points]
            if len(xy) > 1:
                draw.line(xy, fill=colour, width=2)
        draw.text((x0, 28 + panel), f"{low:.2f}-{top:.2f} over steps; grey: control", fill=ERR, font=font)
    return image


def draw(summary: dict, examples: list[dict], path, *, title: str = "", chance: float | None = None) -> Path:
    """Bars on top (with the chance line and a legend), example canvases below (with a legend),
    one PNG written atomically."""
    from ..io import atomic_write

    top = bars(summary, title=title, chance=chance)
    tiles = [example(e) for e in examples]
    legend = 24 if tiles else 0
    tiles_h = max((t.height for t in tiles), default=0)
    width = max(top.width, sum(t.width + 10 for t in tiles))
    image = Image.new("RGB", (width, top.height + legend + tiles_h + 10), "white")
    image.paste(top, (0, 0))
    d, font = ImageDraw.Draw(image), _font(14)
    if tiles:
        d.text((10, top.height + 4), "boxes: target (green), SemClip trained scorer (orange), oracle (blue)",
               fill=ERR, font=font)
    x = 0
    for t in tiles:
        image.paste(t, (x, top.height + legend))
        x += t.width + 10
    learning = curves(summary)
    if learning is not None:
        grown = Image.new("RGB", (max(image.width, learning.width), image.height + learning.height), "white")
        grown.paste(image, (0, 0))
        grown.paste(learning, (0, image.height))
        image = grown
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path
