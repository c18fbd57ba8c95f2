"""The benchmark's PNG, drawn with PIL: accuracy per method with error bars, and example canvases
with the target (green), SemClip's scorer crop (orange) and the oracle's crop (blue)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

BAR, CONTROL, ERR, CHANCE = (70, 110, 190), (170, 170, 170), (20, 20, 20), (200, 30, 30)
BOXES = {"target": (0, 160, 0), "scorer": (240, 140, 0), "oracle": (40, 90, 230)}
# each box kind is drawn this many pixels inside its rectangle, so equal boxes (the scorer chose the
# oracle's crop) show as two nested frames instead of one hiding the other
INSET = {"target": 0, "oracle": 0, "scorer": 4}
BOX_WORDS = {"target": "target (green)", "scorer": "SemClip's trained scorer (orange, inner frame)",
             "oracle": "oracle (blue)"}
ORACLE_NOTE = "semclip-oracle chooses its crop with the reference answer: an upper bound, not a method"
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


def is_control(method: str) -> bool:
    return method.endswith("control")


def legend_for(summary: dict, chance: float | None) -> list[tuple]:
    """The legend's entries for the rows drawn: no control entry without a control row."""
    present = {BAR: any(not is_control(m) for m in summary), CONTROL: any(is_control(m) for m in summary),
               CHANCE: chance is not None}
    entries = [(c, t) for c, t in LEGEND if present[c]]
    return entries + ([(None, ORACLE_NOTE)] if "semclip-oracle" in summary else [])


def heading(seeds: int | None, title: str) -> str:
    spread = "mean ± std over {} seeds".format(seeds) if seeds and seeds > 1 else "1 seed" if seeds == 1 else \
        "mean ± std over seeds"
    return f"accuracy on held-out samples ({spread})" + (f", {title}" if title else "")


def bars(summary: dict, *, width: int = 900, row: int = 26, title: str = "",
         chance: float | None = None, seeds: int | None = None) -> Image.Image:
    """Horizontal bars: mean accuracy, with a whisker of ± one std over seeds (none for one seed); a
    dashed line at `chance`; after each bar its accuracy (and target-in-crop rate); a legend underneath."""
    font, left, right = _font(14), 190, 190
    legend = legend_for(summary, chance)
    axis = 40 + row * len(summary) + 6
    height = axis + 24 + 20 * len(legend) + 8
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 8), heading(seeds, title), fill=ERR, font=font)
    span = width - left - right
    x = lambda v: left + span * max(0.0, min(1.0, v))
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        draw.line((x(tick), 34, x(tick), axis), fill=(225, 225, 225))
        draw.text((x(tick) - 10, axis + 4), f"{tick:.0%}", fill=ERR, font=font)
    for i, (method, r) in enumerate(summary.items()):
        y = 40 + i * row
        mean, std = r["accuracy_mean"], r["accuracy_std"]
        draw.text((10, y + 4), method, fill=ERR, font=font)
        draw.rectangle((x(0), y + 4, x(mean), y + row - 4), fill=CONTROL if is_control(method) else BAR)
        mid = y + row // 2
        if seeds != 1:  # one seed has no spread to show
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
        elif colour is not None:
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
            x0, y0, x1, y1 = (round(v * scale) for v in e[key])
            inset = min(INSET[key], (x1 - x0) // 4, (y1 - y0) // 4)
            draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), outline=colour, width=2)
    font = _font(12)
    draw.text((4, size + 4), e["question"], fill=ERR, font=font)
    draw.text((4, size + 20), f"answer: {e['answer']}", fill=ERR, font=font)
    return tile


def _dashed(draw, xy, colour, dash: int = 6) -> None:
    """A polyline drawn in dashes of `dash` pixels (on, off), so a curve under it stays visible."""
    on, left = True, dash
    for (xa, ya), (xb, yb) in zip(xy, xy[1:]):
        length = max(((xb - xa) ** 2 + (yb - ya) ** 2) ** 0.5, 1e-9)
        done = 0.0
        while done < length:
            step = min(left, length - done)
            if on:
                t0, t1 = done / length, (done + step) / length
                draw.line((xa + (xb - xa) * t0, ya + (yb - ya) * t0, xa + (xb - xa) * t1, ya + (yb - ya) * t1),
                          fill=colour, width=2)
            done += step
            left -= step
            if left <= 0:
                on, left = not on, dash


def curves(summary: dict, *, panel: int = 220) -> Image.Image | None:
    """Each trained method's learning curve (blue, solid) beside its control's (grey, dashed, drawn
    over it), one panel a pair, on a shared loss axis with its values and the steps: a method that
    uses the text should end below its control."""
    pairs = [m for m in summary if "curve" in summary[m] and not is_control(m)]
    if not pairs:
        return None
    font, pad, left = _font(12), 24, 44
    values = [v for m in summary if "curve" in summary[m] for _, v in summary[m]["curve"]]
    top, low = max(values), min(values)
    image = Image.new("RGB", (len(pairs) * (left + panel + pad) + pad, panel + 88), "white")
    draw = ImageDraw.Draw(image)
    y0 = 34  # the panels' top, under their titles
    y = lambda v: y0 + panel * (top - v) / max(top - low, 1e-9)
    for i, method in enumerate(pairs):
        x0 = pad + left + i * (left + panel + pad)
        draw.rectangle((x0, y0, x0 + panel, y0 + panel), outline=(200, 200, 200))
        draw.text((x0 - left, 6), f"{method}: training loss", fill=ERR, font=font)
        for tick in (top, (top + low) / 2, low):  # the loss axis
            draw.line((x0 - 4, y(tick), x0, y(tick)), fill=ERR)
            draw.text((x0 - left, y(tick) - 7), f"{tick:.2f}", fill=ERR, font=font)
        lines = {name: summary.get(name, {}).get("curve") or [] for name in (method, f"{method}-control")}
        last = max([1, *(step for points in lines.values() for step, _ in points)])
        for name, points in lines.items():  # the method solid, then its control dashed over it
            xy = [(x0 + panel * step / last, y(v)) for step, v in points]
            if len(xy) > 1 and is_control(name):
                _dashed(draw, xy, CONTROL)
            elif len(xy) > 1:
                draw.line(xy, fill=BAR, width=2)
        for step, anchor in ((0, x0), (last, x0 + panel)):  # the step axis
            draw.line((anchor, y0 + panel, anchor, y0 + 4 + panel), fill=ERR)
            label = f"{step:g}"
            draw.text((anchor - 3 * len(label), y0 + 6 + panel), label, fill=ERR, font=font)
        draw.text((x0 + panel // 2 - 12, y0 + 6 + panel), "step", fill=ERR, font=font)
        has_control = bool(summary.get(f"{method}-control", {}).get("curve"))
        words = "blue: the method" + ("; grey dashed: its control" if has_control else "")
        draw.text((x0 - left, y0 + 26 + panel), words, fill=ERR, font=font)
    return image


def draw(summary: dict, examples: list[dict], path, *, title: str = "", chance: float | None = None,
         seeds: int | None = None) -> Path:
    """Bars on top (with the chance line and a legend), example canvases below (with a legend),
    one PNG written atomically."""
    from ..io import atomic_write

    top = bars(summary, title=title, chance=chance, seeds=seeds)
    tiles = [example(e) for e in examples]
    legend = 24 if tiles else 0
    tiles_h = max((t.height for t in tiles), default=0)
    width = max(top.width, sum(t.width + 10 for t in tiles))
    image = Image.new("RGB", (width, top.height + legend + tiles_h + 10), "white")
    image.paste(top, (0, 0))
    d, font = ImageDraw.Draw(image), _font(14)
    if tiles:
        drawn = [k for k in BOXES if any(e.get(k) for e in examples)]
        d.text((10, top.height + 4), "boxes: " + ", ".join(BOX_WORDS[k] for k in drawn), fill=ERR, font=font)
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
