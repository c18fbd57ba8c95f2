"""`vlm-adapters semclip ...`: oracle labels, training psi (the crop scorer), and a picture of its choice."""

from __future__ import annotations

from pathlib import Path

import typer

from vlm_adapters.errors import shorten
from vlm_adapters.families import TINY_FAMILIES

from .common import load_model, quiet_transformers, user_errors

app = typer.Typer(help="SemClip: question-relevant crops appended to the overview image, no VLM retraining.",
                  no_args_is_help=True, rich_markup_mode="markdown")

# Options shared by the commands. Use the same crop settings for label, train and show.
FAMILY = typer.Option("", "--family", help="A tiny random-init model of this family (a demo; no download): "
                      f"{', '.join(TINY_FAMILIES)}.")
MODEL = typer.Option("", "--model", help="The VLM: a save_pretrained directory or a hub id (show: default with "
                     "--adapters, the one they were saved from).")
DTYPE = typer.Option("float32", "--dtype", help="Weights dtype with --model: float32, bfloat16 or float16.")
DEVICE = typer.Option("auto", "--device", help="cpu, cuda, cuda:1 ... or auto (cuda when available).")
ARCH = typer.Option("ViT-B-16", "--scorer-arch", help="The scorer's open_clip architecture.")
WEIGHTS = typer.Option(None, "--scorer-weights", help="Its weights, a local .safetensors file (random init without).")
SCALES = typer.Option("2x2,3x3", "--scales", help="Crop grids, ROWSxCOLS, comma-separated.")
OVERLAP = typer.Option(0.1, "--overlap", help="Fraction of a cell added around it.")
MIN_CROP = typer.Option(32, "--min-crop-size", help="Skip a grid whose cells are smaller than this (pixels).")
ON_BAD = typer.Option("skip", "--on-bad-record", help="skip: report a bad record with its id and go on; "
                      "error: stop at the first one.")


def parse_grids(text: str, option: str = "--scales") -> list[list[int]]:
    """"2x2,3x3" -> [[2, 2], [3, 3]]."""
    from vlm_adapters import AdapterError

    try:
        grids = [[int(n) for n in part.lower().split("x")] for part in text.split(",") if part.strip()]
    except ValueError:
        grids = None
    if not grids or any(len(g) != 2 or min(g) < 1 for g in grids):
        raise AdapterError(f"{option} {shorten(text)}: give grids as ROWSxCOLS, comma-separated, e.g. 2x2,3x3")
    return grids


def semclip_config(arch: str, weights: str | None, scales: str, overlap: float, min_crop: int, top_k: int = 1,
                   scorer: str = "psi"):
    from vlm_adapters import SemClipConfig

    return SemClipConfig(scales=parse_grids(scales), overlap=overlap, min_crop_size=min_crop, top_k=top_k,
                         scorer_arch=arch, scorer_weights=weights, scorer=scorer)


def _wrapped(family: str, model: str, dtype: str, device: str, config=None, adapters: Path | None = None):
    """Load the VLM and wrap it with SemClip (`config`) or load saved adapters holding SemClip."""
    import vlm_adapters as va
    from vlm_adapters.train.model import load_trained, resolve_device

    quiet_transformers()
    if adapters and not (family or model):
        from vlm_adapters.provenance import adapters_base

        model = adapters_base(adapters) or ""  # the base the adapters were saved from
    base, processor = load_model(family, model, dtype)
    wrapped = (load_trained(base, adapters, processor) if adapters
               else va.wrap(base, config, processor=processor))
    if "semclip" not in wrapped.adapters:
        raise va.AdapterError(f"{adapters} holds no SemClip adapter (it has {list(wrapped.adapters)})")
    wrapped.to(resolve_device(device))
    return wrapped.eval()


def _shard(device: str):
    """(this process's Shard, its device): under torchrun / accelerate launch each process labels its
    share on its own device (device auto); one process otherwise."""
    import os

    from vlm_adapters.semclip.labels import Shard

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Shard(), device
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    return Shard.from_accelerate(state), str(state.device) if device == "auto" else device


def _check_on_bad(on_bad: str) -> None:
    from vlm_adapters import AdapterError

    if on_bad not in ("skip", "error"):
        raise AdapterError(f"--on-bad-record {shorten(on_bad)}: choose skip or error")


@app.command()
def label(
    data: Path = typer.Argument(..., exists=True, dir_okay=False, help="LLaVA-format conversation JSON (or JSONL)."),
    image_root: Path = typer.Option(..., "--image-root", exists=True, file_okay=False,
                                    help="The folder the records' image paths are relative to."),
    out: Path = typer.Option(..., "--out", dir_okay=False, help="The labels JSONL (appended to; resumable)."),
    family: str = FAMILY, model: str = MODEL, dtype: str = DTYPE, device: str = DEVICE,
    scorer_arch: str = ARCH, scorer_weights: str = WEIGHTS, scales: str = SCALES, overlap: float = OVERLAP,
    min_crop_size: int = MIN_CROP, on_bad_record: str = ON_BAD,
    batch_size: int = typer.Option(0, "--batch-size", min=0, help="Candidate crops per VLM call (0: all of a "
                                   "sample's crops at once; halved when the GPU runs out of memory)."),
    allow_outside_root: bool = typer.Option(False, "--allow-outside-root", help="Label records whose image path "
                                            "leaves --image-root (`..`, an absolute path elsewhere); as training's "
                                            "data.allow_outside_root."),
) -> None:
    """Label each (image, question, answer) with its oracle crop (resumable; shards over processes).

    The oracle crop is the candidate that makes the frozen VLM most likely to give the answer.
    Writes one JSONL line per record; ids already in OUT are skipped, so an interrupted run
    continues where it stopped. Under `torchrun` / `accelerate launch` each process labels its
    share of the records and the shards are merged into OUT (the same file as one process writes)."""
    from vlm_adapters.semclip.labels import label_dataset

    with user_errors():
        _check_on_bad(on_bad_record)
        config = semclip_config(scorer_arch, scorer_weights, scales, overlap, min_crop_size)
        shard, device = _shard(device)
        wrapped = _wrapped(family, model, dtype, device, config)
        report = label_dataset(wrapped, data, image_root, out, on_bad=on_bad_record, batch_size=batch_size or None,
                               progress=True, shard=shard, allow_outside_root=allow_outside_root,
                               on_bad_record=lambda bad: typer.echo(
                                   f"skipped record {bad.id}: {bad.reason}", err=True))
        if shard.rank != 0:
            return
    share = f" (this process's share of {shard.world_size})" if shard.world_size > 1 else ""
    typer.echo(f"wrote {report.written} labels{share} to {out} ({report.already_done} already done, "
               f"{len(report.bad)} bad record(s) skipped); it holds {report.total} labels")


@app.command()
def train(
    labels: Path = typer.Argument(..., exists=True, dir_okay=False, help="Labels JSONL from `semclip label`."),
    image_root: Path = typer.Option(..., "--image-root", exists=True, file_okay=False,
                                    help="The folder the labels' image paths are relative to."),
    out: Path = typer.Option(..., "--out", file_okay=False, help="The adapter directory to write (heads only)."),
    family: str = FAMILY, model: str = MODEL, dtype: str = DTYPE, device: str = DEVICE,
    scorer_arch: str = ARCH, scorer_weights: str = WEIGHTS, scales: str = SCALES, overlap: float = OVERLAP,
    min_crop_size: int = MIN_CROP, on_bad_record: str = ON_BAD,
    top_k: int = typer.Option(1, "--top-k", min=0, help="Crops per image the saved adapter appends."),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Passes over the labels."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate of the heads."),
    temperature: float = typer.Option(0.07, "--temperature", help="InfoNCE temperature (cosine / temperature)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Questions per optimizer step."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay of the heads."),
    seed: int = typer.Option(0, "--seed", help="Shuffling seed."),
    allow_outside_root: bool = typer.Option(False, "--allow-outside-root", help="Accept labels whose image path "
                                            "leaves --image-root (as `semclip label --allow-outside-root`)."),
) -> None:
    """Train psi, the crop scorer, on oracle labels.

    InfoNCE over each question's candidate crops with the oracle crop as the positive. Only the
    two small heads train; the CLIP embeddings are computed once."""
    from vlm_adapters.semclip.labels import label_examples, read_labels
    from vlm_adapters.semclip.train import cache_features, train_scorer

    with user_errors():
        _check_on_bad(on_bad_record)
        examples = label_examples(read_labels(labels), image_root, allow_outside_root)
        config = semclip_config(scorer_arch, scorer_weights, scales, overlap, min_crop_size, top_k)
        wrapped = _wrapped(family, model, dtype, device, config)
        scorer = wrapped.adapters["semclip"].scorer
        cache = cache_features(scorer, examples, on_bad=on_bad_record, progress=True)
        for rid, why in cache.skipped:
            typer.echo(f"skipped label {rid}: {why}", err=True)
        history = train_scorer(scorer, cache, epochs=epochs, lr=lr, temperature=temperature, batch_size=batch_size,
                               weight_decay=weight_decay, seed=seed, progress=True)
        wrapped.save_adapters(out)
    typer.echo(f"trained psi on {len(cache)} questions ({len(cache.skipped)} skipped): loss "
               f"{history.initial_loss:.4f} -> {history.loss[-1]:.4f}, top-1 agreement with the labels "
               f"{history.initial_agreement:.1%} -> {history.agreement[-1]:.1%}; saved the heads to {out}")


@app.command()
def show(
    image: Path = typer.Argument(..., exists=True, dir_okay=False, help="The image file."),
    question: str = typer.Option(..., "--question", help="The question asked about the image."),
    out: Path = typer.Option(..., "--out", dir_okay=False, help="The PNG to write: the question, the image "
                             "(enlarged when small) under the heatmap, the colour scale."),
    family: str = FAMILY, model: str = MODEL, dtype: str = DTYPE, device: str = DEVICE,
    adapters: Path = typer.Option(None, "--adapters",
                                  help="An adapter directory with SemClip (e.g. from `semclip train`), a "
                                       "checkpoint, or a training output directory (its latest checkpoint); "
                                       "without it a fresh, untrained scorer from the options below."),
    top_k: int = typer.Option(None, "--top-k", min=0, help="Crops to choose (default: the adapter's top_k)."),
    grid: str = typer.Option("2x2", "--grid", help="The AnyRes-style grid the token accounting compares with."),
    alpha: float = typer.Option(0.45, "--alpha", min=0.0, max=1.0, help="Opacity of the heatmap."),
    scorer_arch: str = ARCH, scorer_weights: str = WEIGHTS, scales: str = SCALES, overlap: float = OVERLAP,
    min_crop_size: int = MIN_CROP,
    scorer: str = typer.Option("psi", "--scorer", help="Without --adapters: attention (the VLM's own relative "
                               "attention, no weights at all), clip (CLIP's cosine, no heads) or psi."),
) -> None:
    """Draw the crop scores over IMAGE as a heatmap, with the chosen crops outlined.

    Each pixel shows the best score of the candidate crops covering it; with the attention scorer,
    the relative attention of the overview's token under it. Prints the chosen boxes, their scores
    and the token accounting."""
    import dataclasses

    import vlm_adapters as va
    from vlm_adapters.inputs import open_image
    from vlm_adapters.semclip.tokens import token_accounts

    with user_errors():
        picture = open_image(image)
        if not question.strip():
            raise va.AdapterError("--question is empty: ask something about the image")
        grids = parse_grids(grid, "--grid")
        if len(grids) != 1:
            raise va.AdapterError(f"--grid {shorten(grid)}: give one grid, e.g. 2x2")
        config = None if adapters else semclip_config(scorer_arch, scorer_weights, scales, overlap, min_crop_size,
                                                      scorer=scorer)
        wrapped = _wrapped(family, model, dtype, device, config, adapters)
        semclip = wrapped.adapters["semclip"]
        if top_k is not None:
            semclip.config = dataclasses.replace(semclip.config, top_k=top_k)
        attention = semclip.config.scorer == "attention"
        if attention and semclip.config.top_k == 0:
            raise va.AdapterError("--top-k 0 with the attention scorer: nothing is scored; give --top-k 1 or more")
        choice = run_once(wrapped, picture, question)
        amap = semclip.last_maps[0] if attention else None
        account = token_accounts(wrapped, [picture], grid=tuple(grids[0]))[0]
        out.parent.mkdir(parents=True, exist_ok=True)
        untrained = "" if adapters else untrained_note(config.scorer, config.scorer_weights)
        render_scores(picture, choice, alpha=alpha, question=question, attention=amap,
                      untrained=untrained).save(out, format="PNG")
    if amap is not None:
        typer.echo(f"relative attention (question / {semclip.config.generic_question!r}) of LLM layer(s) "
                   f"{amap.layers}, on the overview's {amap.relative.shape[0]}x{amap.relative.shape[1]} grid: "
                   f"{float(amap.relative.min()):.3g} .. {float(amap.relative.max()):.3g}")
    typer.echo(f"{len(choice.boxes)} candidate crops, scores {min(choice.scores):.4f} .. {max(choice.scores):.4f}")
    for rank, i in enumerate(choice.chosen, 1):
        typer.echo(f"  #{rank}: box {tuple(choice.boxes[i])} score {choice.scores[i]:.4f}")
    typer.echo(account)
    typer.echo(f"wrote {out}")


def untrained_note(scorer: str, scorer_weights: str | None) -> str:
    """What a fresh scorer (no --adapters) is, for the picture: nothing to say of the attention scorer
    (nothing of it trains) nor of CLIP's zero-shot scores from weights."""
    if scorer == "attention" or (scorer == "clip" and scorer_weights):
        return ""
    if scorer == "clip":
        return ("random-init CLIP: no --scorer-weights, so its zero-shot scores mean nothing; give a CLIP's "
                ".safetensors weights, or use --scorer attention")
    if scorer_weights:
        return ("untrained heads: these are the CLIP's zero-shot scores (--scorer-weights); train psi with "
                "`semclip train` and pass --adapters")
    return ("untrained scorer: a random-init CLIP and fresh heads (no --adapters, no --scorer-weights), so the "
            "scores mean nothing yet; train one with `semclip train` and pass --adapters")


def run_once(wrapped, image, question: str):
    """One call of the wrapped VLM (one prefill) on `image` and `question`; SemClip's Choice for it,
    with every candidate's score even when top_k=0 (then nothing is chosen)."""
    import torch

    from vlm_adapters.adapters.semclip import Choice
    from vlm_adapters.inputs import chat_prompt
    from vlm_adapters.processing import process
    from vlm_adapters.semclip.scorer import to_rgb

    processor, rgb = wrapped.processor, to_rgb(image)
    inputs = process(processor, [chat_prompt(processor, question)], [rgb])
    inputs = {k: v.to(wrapped.device, wrapped.dtype) if v.is_floating_point() else v.to(wrapped.device)
              for k, v in inputs.items()}
    semclip = wrapped.adapters["semclip"]
    with torch.no_grad():
        wrapped(**inputs, images=[image], guidance_text=[question])
        if semclip.last_choices:
            return semclip.last_choices[0]
        boxes, scores = semclip.score([rgb], [question])[0]
    return Choice(boxes, scores.tolist(), [])


def render_scores(image, choice, *, alpha: float = 0.45, question: str | None = None, attention=None,
                  untrained: str = ""):
    """`image` (RGB; enlarged when small) under a blue-yellow-red heatmap, each pixel the best score
    of the candidate boxes covering it (with `attention`, an AttentionMap: the relative attention of the
    overview token under it), with the chosen boxes outlined with rank and score; above it the
    question, below it the colour scale and a note when the scorer is `untrained` (the words) or every
    candidate scores the same."""
    import torch
    from PIL import Image, ImageDraw

    from vlm_adapters.pictures import NOTE, caption, colour_bar, colourize, enlarge, font, stack
    from vlm_adapters.semclip.scorer import to_rgb

    rgb = to_rgb(image)
    width, height = rgb.size
    heat = torch.full((height, width), float("-inf"))
    scores = choice.scores if choice.scores is not None else [0.0] * len(choice.boxes)  # given boxes: no scores
    if attention is not None:
        x0, y0, x1, y1 = (round(v) for v in attention.view)
        grid = attention.relative.float().cpu()[None, None]
        heat[y0:y1, x0:x1] = torch.nn.functional.interpolate(grid, size=(y1 - y0, x1 - x0), mode="nearest")[0, 0]
    else:
        for (x0, y0, x1, y1), score in zip(choice.boxes, scores):
            heat[y0:y1, x0:x1].clamp_(min=float(score))
    covered = torch.isfinite(heat)
    lo, hi = heat[covered].min(), heat[covered].max()
    heat = ((heat - lo) / (hi - lo).clamp(min=1e-12)).where(covered, torch.zeros(()))
    grey = Image.frombytes("L", rgb.size, heat.mul(255).round().to(torch.uint8).numpy().tobytes())
    shown, factor = enlarge(Image.blend(rgb, colourize(grey), alpha))
    draw = ImageDraw.Draw(shown)
    line = max(1, round(min(shown.size) / 150))
    face = font(max(10, min(shown.size) // 25))
    for rank, i in enumerate(choice.chosen, 1):
        x0, y0, x1, y1 = (v * factor for v in choice.boxes[i])
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline="#00ff66", width=line)
        draw.text((x0 + line + 2, y0 + line + 1), f"#{rank} {scores[i]:.3f}", fill="white",
                  font=face, stroke_width=1, stroke_fill="black")
    texts = explain_scores(choice, question, enlarged=factor, untrained=untrained)
    if attention is not None:
        texts["scale"] = (f"relative attention (question / generic question), LLM layer(s) {attention.layers}; "
                          "each pixel: its overview token")
    return stack(caption(texts["title"], shown.width) if texts["title"] else None, shown,
                 colour_bar(shown.width, float(lo), float(hi), texts["scale"]),
                 caption(texts["note"], shown.width, fill=NOTE) if texts["note"] else None)


def explain_scores(choice, question: str | None, *, enlarged: int = 1, untrained: str = "") -> dict:
    """The words `render_scores` writes on the picture: title (the question), the colour scale's
    label, and a note when the map says nothing (every candidate scored alike, or no scores)."""
    from vlm_adapters.pictures import is_flat

    title = f"Q: {question}" if question else ""
    if enlarged > 1:
        title += f"{'  ' if title else ''}(image enlarged {enlarged}x)"
    scale = "crop score (psi); each pixel: the best of the candidate crops covering it"
    note = ""
    if choice.scores is None:
        note = "no scores: the crops were given (crop_boxes), not chosen by the scorer"
    elif is_flat(choice.scores):
        note = (f"flat map: all {len(choice.scores)} candidate crops score {choice.scores[0]:.4g}, so the scorer "
                "ranks none above another (an untrained scorer? train one with `semclip train`)")
    note = "  ".join(n for n in (untrained, note) if n)
    return {"title": title, "scale": scale, "note": note}
