"""`vlm-adapters tie ...`: TIE's per-block maps as a PNG overlay, and its vision-tower cost."""

from __future__ import annotations

import contextlib
import statistics
from pathlib import Path

import typer

from vlm_adapters.errors import shorten
from vlm_adapters.families import TINY_FAMILIES

from .common import load_model, quiet_transformers

app = typer.Typer(help="TIE: the question injected into every block of the vision encoder.", no_args_is_help=True,
                  rich_markup_mode="markdown")
MAPS = ("attention", "injection")


@app.command()
def show(
    image: Path = typer.Argument(..., exists=True, dir_okay=False, help="The image file."),
    question: str = typer.Option(..., help="The question asked about the image."),
    out: Path = typer.Option(..., help="The PNG to write."),
    family: str = typer.Option("", help="Build a tiny random-init model of this family (no download): "
                               f"{', '.join(TINY_FAMILIES)}."),
    model: str = typer.Option("", help="A model directory (or hub id) that AutoModelForImageTextToText loads. "
                              "Default with --adapters: the one they were saved from."),
    adapters: str = typer.Option("", help="An adapter directory with a TIE adapter, a checkpoint, or a training "
                                 "output directory (its latest checkpoint). Default: a fresh TIE."),
    map: str = typer.Option("attention", help="attention: each patch's strongest attention to a question token "
                            "(or to --token); injection: norm of the gated update added to each patch."),
    token: int | None = typer.Option(None, help="With --map attention: the question token to show."),
    layer: int | None = typer.Option(None, help="Show only this block (default: the mean, then every block)."),
) -> None:
    """Draw where TIE injects the question into the vision encoder, over the image."""
    from vlm_adapters.errors import AdapterError

    try:
        _show(image, question, out, family, model, adapters, map, token, layer)
    except AdapterError as err:  # bad input: one line and exit code 2, no traceback
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def _show(image, question, out, family, model, adapters, map, token, layer) -> None:
    import torch

    import vlm_adapters as va
    from vlm_adapters.adapters.tie import attention_maps
    from vlm_adapters.inputs import chat_prompt, open_image, to_rgb
    from vlm_adapters.processing import process
    from vlm_adapters.train.model import load_trained

    if map not in MAPS:
        raise va.AdapterError(f"--map {shorten(map)}; choose one of {MAPS}")
    quiet_transformers()
    if adapters and not (family or model):
        from vlm_adapters.provenance import adapters_base

        model = adapters_base(adapters) or ""  # the base the adapters were saved from
    base, processor = load_model(family, model)
    wrapped = (load_trained(base, adapters, processor) if adapters
               else va.wrap(base, va.TIEConfig(generic_query="Describe the image."), processor=processor))
    if "tie" not in wrapped.adapters:
        raise va.AdapterError(f"{adapters} holds no TIE adapter (it has {list(wrapped.adapters)})")
    picture = to_rgb(open_image(image))
    inputs = process(processor, [chat_prompt(processor, question)], [picture])
    inputs = {k: v.to(base.device, base.dtype) if v.is_floating_point() else v.to(base.device)
              for k, v in inputs.items()}
    maps = attention_maps(wrapped, inputs, guidance_text=[question])

    if map == "injection":
        values = maps.injection
    elif token is None:
        values = maps.attention.amax(-1)
    elif -maps.attention.shape[-1] <= token < maps.attention.shape[-1]:
        values = maps.attention[..., token]
    else:
        raise va.AdapterError(f"--token {token}: the question has {maps.attention.shape[-1]} tokens")
    if layer is not None and layer not in maps.blocks:
        raise va.AdapterError(f"--layer {layer}: TIE injects into blocks {maps.blocks}")
    panels = ({f"block {layer}": values[maps.blocks.index(layer)]} if layer is not None
              else {"mean": values.mean(0), **{f"block {b}": v for b, v in zip(maps.blocks, values)}})
    gates = torch.stack([g.gate.detach().float() for g in wrapped.adapters["tie"].layers.values()])
    note = untrained_note(map) if not gates.any() else None
    out.parent.mkdir(parents=True, exist_ok=True)
    render(picture, panels, question, map=map, note=note).save(out, format="PNG")
    if note:
        typer.echo(note)
    typer.echo(f"wrote {out} ({len(panels)} panels, blocks {maps.blocks})")


def untrained_note(map: str) -> str:
    """What the picture of a TIE whose every gate is 0 (untrained: a fresh one, or not trained yet) shows."""
    if map == "injection":
        return ("flat map: every gate is 0 (an untrained TIE injects nothing yet); "
                "try --map attention, or --adapters with a trained TIE")
    return ("untrained TIE: every gate is 0, so the question does not change the encoder yet; this attention is "
            "from random-init weights (pass --adapters with a trained TIE)")


SCALES = {"attention": "attention of a patch to the question (the strongest token, or --token)",
          "injection": "norm of the gated update TIE adds to a patch"}


def overlay(image, heat, *, lo: float, hi: float, size: int = 256, alpha: float = 0.55):
    """`image` resized to `size` wide (small images are enlarged) with `heat` (h, w), scaled from `lo`
    (blue) to `hi` (red), as an overlay."""
    from PIL import Image

    from vlm_adapters.pictures import colourize

    heat = ((heat.float() - lo) / max(hi - lo, 1e-12)).clamp(0, 1)
    grey = Image.frombytes("L", (heat.shape[1], heat.shape[0]), bytes((heat * 255).round().byte().flatten().tolist()))
    shown = image.resize((size, max(1, round(size * image.height / image.width))))
    return Image.blend(shown, colourize(grey.resize(shown.size, Image.BILINEAR)), alpha)


def render(image, panels: dict, question: str, *, map: str = "attention", note: str | None = None,
           columns: int = 4):
    """Labelled overlays in a grid, all on one colour scale: the question above, the scale below, and
    `note` (or, when every value is the same, a note saying the map is flat) under it."""
    import torch
    from PIL import Image, ImageDraw

    from vlm_adapters.pictures import NOTE, caption, colour_bar, font, is_flat, stack

    values = torch.stack([heat.float() for heat in panels.values()])
    lo, hi = values.min().item(), values.max().item()
    if note is None and is_flat(values):
        note = f"flat map: every value is {lo:.4g}, so there is nothing to see"
    tiles = [overlay(image, heat, lo=lo, hi=hi) for heat in panels.values()]
    w, h, label = tiles[0].width, tiles[0].height, 16
    cols = min(columns, len(tiles))
    rows = -(-len(tiles) // cols)
    grid = Image.new("RGB", (cols * w, rows * (h + label)), "white")
    draw, face = ImageDraw.Draw(grid), font(12)
    for i, (name, tile) in enumerate(zip(panels, tiles)):
        x, y = (i % cols) * w, (i // cols) * (h + label)
        draw.text((x + 4, y + 1), name, fill="black", font=face)
        grid.paste(tile, (x, y + label))
    return stack(caption(f"TIE {map} map.  Q: {question}", grid.width), grid,
                 colour_bar(grid.width, lo, hi, SCALES.get(map, map)),
                 caption(note, grid.width, fill=NOTE) if note else None)


@app.command()
def bench(
    hidden: int = typer.Option(768, help="CLIP vision width."),
    layers: int = typer.Option(12, help="CLIP vision blocks."),
    image_size: int = typer.Option(336, help="Input size (patch 14)."),
    repeats: int = typer.Option(5, help="Timed runs after one warm-up; the median is reported."),
) -> None:
    """Vision-tower time with TIE vs without, on a random-init LLaVA with a CLIP tower of this size."""
    import torch

    import vlm_adapters as va
    from vlm_adapters.bench.perf_timers import Clock, time_inside
    from vlm_adapters.families import Size, clip, llama, parts
    from vlm_adapters.integrations import get_shim

    row = Size("llava", clip(hidden, 4 * hidden, layers, hidden // 64, image_size), llama(256, 512, 1, 4, 4),
               processor=dict(image_size=image_size))
    model_cls, config, processor = parts(row)
    tok = processor.tokenizer
    torch.manual_seed(0)
    model = model_cls(config).eval()
    question = "What colour is the small square in the top left corner?"
    ids = [tok.bos_token_id] + [get_shim(model).image_token_id] * (image_size // 14) ** 2 + tok(question)["input_ids"][1:]
    inputs = {"input_ids": torch.tensor([ids]), "pixel_values": torch.randn(1, 3, image_size, image_size)}

    clock = Clock("cpu")
    base, tie, inside = [], [], []
    with torch.no_grad():
        for i in range(repeats + 1):  # base and TIE alternate, so that drift hits both; run 0 warms up
            with time_inside(model.model.vision_tower, clock) as towers:
                model(**inputs)
            wrapped = va.wrap(model, va.TIEConfig(), processor=tok)
            with time_inside(model.model.vision_tower, clock) as tie_towers, contextlib.ExitStack() as stack:
                injections = [stack.enter_context(time_inside(layer, clock))
                              for layer in wrapped.adapters["tie"].layers.values()]
                wrapped(**inputs, guidance_text=[question])
            model = wrapped.unwrap()
            if i:
                base.append(1000 * towers[0])
                tie.append(1000 * tie_towers[0])
                inside.append(1000 * sum(map(sum, injections)))
    med = statistics.median
    params = sum(p.numel() for p in wrapped.adapters.parameters())
    typer.echo(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CLIP {hidden}x{layers} at {image_size}px; "
               f"TIE on {len(wrapped.adapters['tie'].blocks)} blocks, {params:,} parameters; median of {repeats} pairs")
    typer.echo(f"vision tower: base {med(base):.1f} ms, with TIE {med(tie):.1f} ms: "
               f"TIE/base {med(t / b for t, b in zip(tie, base)):.3f}")
    typer.echo(f"within the TIE runs, {med(inside):.1f} ms in TIE's cross-attention: "
               f"TIE/base {med(t / (t - x) for t, x in zip(tie, inside)):.3f} (robust to a busy CPU)")
