"""`vlm-adapters bench effect`: does each adapter help the frozen base VLM on the fine-detail world?

Three regimes (`REGIMES`; base_model.py says how each base is trained): "detail", where the pattern
is lost in the shrunk overview and a crop recovers it (SemClip's premise); "clutter", where the
canvas is seen at full resolution but holds distractors the base never saw in training; and
"where", the same with the objects in grid cells and the question naming the cell.

Per seed (the evaluation world, the adapters' initialisation and training order): the base alone;
SemClip with a random candidate crop, with the trained scorer psi (oracle labels on training
samples, then `train_scorer`), and with the oracle's crop; TG-FOM, TG-DP, TG-FOM+TG-DP and TIE,
each trained adapter-only with the same budget on the same batches of fresh samples (a stream that
never repeats, unless `train_samples` asks for a fixed pool), and each again as a control whose
text input is one constant string (the LLM still reads the real question in its prompt). Mean ± std
over seeds. Nothing is reported from a base that fails its bar (`check_bar`).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlm_adapters.integrations import get_shim

from ..errors import AdapterError
from ..inputs import chat_prompt
from ..processing import process
from ..provenance import base_record, provenance
from .base_model import BaseConfig, cache_root, check_bar, lm_batch, load_or_train, target_boxes, views_legend
from .evaluate import accuracy, predict
from .fit import fit
from .world import WorldConfig, answers, make_samples

ADAPTER_SEED_OFFSET = 2_000_000  # adapters and psi train on worlds far from the evaluation seeds
# SemClip's crop: random, chosen with no training by the base's own relative attention or by CLIP's cosine
# alone, by the trained scorer, the oracle's, or the smallest candidate that holds the target
# ("semclip-target": the honest ceiling of any crop chooser)
SEMCLIP = ("semclip-random", "semclip-attention", "semclip-clip", "semclip-scorer", "semclip-oracle",
           "semclip-target")
ZERO_TRAINING = {"semclip-attention": "attention", "semclip-clip": "clip"}  # row -> SemClipConfig.scorer
TRAINED = ("tgfom", "tgdp", "tgfom+tgdp", "tie")
METHODS = ("base", *SEMCLIP, *(m + c for m in TRAINED for c in ("", "-control")))
# run when named, not in "all": sparse TG-DP (its most relevant tile only, chosen by the overview-question
# similarity, or "-psi": by SemClip's trained scorer psi, stacked without crops); "-code": the adapter's text is a
# clean code of the target's cell instead of the question (diagnosis: can the mechanism select when told where);
# "cotrain": what the trained rows co-train (`lora`, `projector`, `tower_blocks`) alone, without an adapter
# ("lora" is its older name), the second partner of every co-trained row beside its control
CODED = tuple(f"{m}-code" for m in TRAINED)
OPTIONAL = ("tgdp-k1", "tgdp-k1-control", "tgdp-k1-psi", "tgdp-k1-psi-control", *CODED, "cotrain", "lora")
ALONE = ("cotrain", "lora")
CONTROL_TEXT = "What pattern is on the object?"
# One code word per cell (2x2 quadrants of the canvas, or the world's grid cells): single characters the world's
# questions never use, so their embeddings share nothing (RESULTS.md, Effect VI, measures the cosines)
CODE_WORDS = ("0", "1", "2", "3", "4", "5", "6", "7", "8")


def regime_world(regime: str, **overrides) -> WorldConfig:
    """The world of a regime with `overrides` (None values ignored): "detail" is WorldConfig's
    default; "clutter" draws the canvas at the base's input size (48 px), where the patterns stay
    readable; "where" puts clutter's objects in a 2x2 grid and names the target by its cell."""
    clutter = dict(canvas_size=48, object_size=14, margin=2)
    preset = {"detail": {}, "clutter": clutter, "where": clutter | dict(grid=2, refer="place")}
    if regime not in preset:
        raise AdapterError(f"regime {regime!r}: choose one of {', '.join(preset)}")
    return WorldConfig(**(preset[regime] | {k: v for k, v in overrides.items() if v is not None}))


@dataclass
class EffectConfig:
    world: WorldConfig = field(default_factory=WorldConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    seeds: int = 3
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1: a long run split by seed, parts joined by combine()
    eval_samples: int = 200
    train_samples: int = 0  # 0: a fresh sample every time (a stream); N: a fixed pool of N, repeated
    objects: int | None = None  # objects a canvas in the adapters' samples (None: the world's); the base: the world's
    psi_samples: int = 200
    psi_epochs: int = 30
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    tgdp_readout: str = "connector"  # TG-DP's readout in every TG-DP row (TGDPConfig.readout)
    text: str = "vlm"  # the adapters' question features: "vlm" (its own embeddings) or "hf:NAME" (a transformers encoder)
    lora: int = 0  # > 0: every trained row also trains LoRA of this rank on the LLM (TG-LLaVA's stage 2 tunes it)
    projector: bool = False  # every trained row also trains the projector (TG-LLaVA's stage 1 trains it)
    tower_blocks: int = 0  # every trained row also trains the vision tower's last N blocks (TIE's encoder trains)
    methods: tuple = METHODS
    control_text: str = CONTROL_TEXT
    scorer_arch: str = ""  # default: the tiny open_clip architecture
    scorer_clip: str = "world"  # "world": a CLIP trained on the world's crops and object names; "random"
    clip_steps: int = 200
    cache: Path | None = None
    progress: bool = True
    examples: int = 3  # canvases drawn with their chosen crops

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS + OPTIONAL]
        if unknown:
            raise AdapterError(f"unknown methods {unknown}; choose from {', '.join(METHODS + OPTIONAL)}")
        if self.scorer_clip not in ("world", "random"):
            raise AdapterError(f"scorer_clip={self.scorer_clip!r}: choose 'world' (trained on the world) or 'random'")
        from ..adapters.tgdp import READOUTS

        if self.tgdp_readout not in READOUTS:
            raise AdapterError(f"tgdp_readout={self.tgdp_readout!r}: choose one of {', '.join(READOUTS)}")
        text_config(self.text)  # a clear error for a bad --text
        if self.lora < 0:
            raise AdapterError(f"lora={self.lora}: give LoRA's rank (>= 1), or 0 for none")
        if self.tower_blocks < 0:
            raise AdapterError(f"tower_blocks={self.tower_blocks}: give how many of the tower's last blocks train (>= 0)")
        if any(m in ALONE for m in self.methods) and not self.cotrains:
            raise AdapterError("the 'cotrain' row trains what the adapters co-train, alone: ask for some, e.g. "
                               "--lora 8, --projector or --tower-blocks 1")
        if self.objects is not None and not 1 <= self.objects <= self.world.num_objects:
            raise AdapterError(f"objects={self.objects}: the adapters' canvases hold 1 to the world's "
                               f"{self.world.num_objects} objects (its base was trained on that world)")
        counts = (self.seeds, self.eval_samples, self.batch_size, self.steps)
        if min(counts) < 1 or min(self.train_samples, self.first_seed) < 0:
            raise AdapterError("seeds, eval_samples, steps and batch_size must be >= 1, train_samples and "
                               "first_seed >= 0")

    @property
    def cotrains(self) -> bool:
        """Whether the trained rows co-train parts of the base (LoRA, the projector, tower blocks)."""
        return bool(self.lora or self.projector or self.tower_blocks)

    @classmethod
    def from_options(cls, *, regime: str = "detail", canvas_size: int | None = None, num_objects: int | None = None,
                     object_size: int | None = None, mark_width: int | None = None, marks: str | None = None,
                     base_steps: int | None = None,
                     base_size: str = "small", methods: str = "all", **options) -> EffectConfig:
        world = regime_world(regime, canvas_size=canvas_size, num_objects=num_objects, object_size=object_size,
                             mark_width=mark_width, marks=parse_marks(marks))
        base = BaseConfig(size=base_size, regime=regime, **({} if base_steps is None else {"steps": base_steps}))
        chosen = METHODS if methods.strip() == "all" else tuple(m.strip() for m in methods.split(",") if m.strip())
        return cls(world=world, base=base, methods=chosen, **options)


def parse_marks(marks: str | None) -> tuple | None:
    """`--marks`: a count (the first N of the world's patterns) or comma-separated names; None: the regime's."""
    from .world import MARKS

    if marks is None or not str(marks).strip():
        return None
    text = str(marks).strip()
    if text.isdigit():
        if not 2 <= int(text) <= len(MARKS):
            raise AdapterError(f"--marks {text}: give 2 to {len(MARKS)} (the patterns {', '.join(MARKS)}) or names")
        return MARKS[:int(text)]
    return tuple(m.strip() for m in text.split(",") if m.strip())


def text_config(text: str):
    """The guidance backend of `--text`: "vlm" (the VLM's own embeddings) or "hf:NAME" (a transformers
    encoder, hub id or local path, mean-pooled: TextConfig(backend="hf"))."""
    from ..config import TextConfig

    if text == "vlm":
        return TextConfig()
    if text.startswith("hf:") and text[3:].strip():
        return TextConfig(backend="hf", name=text[3:].strip())
    raise AdapterError(f"text={text!r}: give 'vlm' (the VLM's own embeddings) or 'hf:NAME' (a transformers encoder, "
                       "e.g. hf:sentence-transformers/all-MiniLM-L6-v2 or hf:/path/to/model)")


def adapter_configs(method: str, *, readout: str = "connector", text: str = "vlm"):
    """Each trained method's adapters, sized for a CPU run; the text is the VLM's own embeddings, or
    `text` (text_config); `readout`: TG-DP's (TGDPConfig.readout)."""
    from .. import TGDPConfig, TGFOMConfig, TIEConfig

    make = {"tgfom": lambda: TGFOMConfig(hidden_size=64, num_heads=4, mlp_ratio=2),
            "tgdp": lambda: TGDPConfig(num_latents=16, hidden_size=64, num_heads=4, bind_ratio=2, readout=readout),
            "tgdp-k1": lambda: TGDPConfig(num_latents=16, hidden_size=64, num_heads=4, bind_ratio=2, tiles=1,
                                          readout=readout),
            "tie": lambda: TIEConfig(num_heads=4, head_dim=16),
            "cotrain": lambda: TGFOMConfig(hidden_size=64, num_heads=4, mlp_ratio=2)}  # frozen: exactly the base
    make["lora"] = make["cotrain"]
    configs = tuple(make[m.removesuffix("-psi")]() for m in method.split("+"))  # -psi: the same, psi choosing
    for cfg in configs:
        cfg.text = text_config(text)
    return configs


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


class SeedRun:
    """Every method on one seed: shares the base, the samples and SemClip's oracle results."""

    def __init__(self, config: EffectConfig, model, processor, seed: int, scorer_weights: str | None = None):
        self.config, self.model, self.processor, self.seed = config, model, processor, seed
        self.scorer_weights, self._psi = scorer_weights, None
        self.world = dataclasses.replace(config.world, num_objects=config.objects or config.world.num_objects)
        self.eval = make_samples(self.world, config.eval_samples, seed=seed)
        self.train_seed = ADAPTER_SEED_OFFSET + seed
        self.pool = make_samples(self.world, config.train_samples, seed=self.train_seed)
        inputs = process(processor, [chat_prompt(processor, "?")], [self.eval[0].image])
        self.overview_tokens = int(get_shim(model, processor.tokenizer).image_run_lengths(inputs["input_ids"]).sum())
        self.examples: list[dict] = []

    def predict(self, model, **kwargs) -> float:
        c = self.config
        preds = predict(model, self.processor, self.eval, batch_size=c.batch_size, progress=c.progress, **kwargs)
        return accuracy(preds, self.eval)

    def predict_batches(self, model, after, **kwargs) -> tuple[float, float]:
        """Accuracy and seconds of `model` on the held-out samples, one generate call a batch;
        `after(part)` reads what the adapters chose for that batch."""
        hits, seconds, size = 0, 0.0, self.config.batch_size
        for i in range(0, len(self.eval), size):
            part = self.eval[i : i + size]
            start = time.perf_counter()
            preds = predict(model, self.processor, part, batch_size=size, **kwargs)
            seconds += time.perf_counter() - start
            hits += round(accuracy(preds, part) * len(part))
            after(part)
        return hits / len(self.eval), seconds

    def base(self) -> dict:
        acc, seconds = _timed(lambda: self.predict(self.model))
        return dict(accuracy=acc, tokens=self.overview_tokens, train_s=0.0, eval_s=seconds, trainable=0)

    # -- SemClip ------------------------------------------------------------------------------------
    def semclip_config(self, top_k: int = 1):
        from .. import SemClipConfig

        c = self.config
        return SemClipConfig(top_k=top_k, scales=c.base.scales, scorer_arch=scorer_arch(c), scorer_seed=self.seed,
                             scorer_weights=self.scorer_weights)

    def semclip(self, wanted: list[str]) -> dict[str, dict]:
        from .. import wrap
        from ..semclip.oracle import oracle
        c = self.config
        wrapped = wrap(self.model, self.semclip_config(), processor=self.processor)
        semclip, rows = wrapped.adapters["semclip"], {}
        try:
            oracles, oracle_s = _timed(lambda: [oracle(wrapped, s.image, s.question, _spoken(s)) for s in self.eval])
            tokens = self.overview_tokens * 2  # the overview and one crop of the same size
            rng = random.Random(self.seed)
            picks = {"semclip-random": lambda s, r: rng.choice(semclip.proposals(s.image)),
                     "semclip-oracle": lambda s, r: r.best_box,
                     "semclip-target": lambda s, r: target_boxes(s, c.base)[0]}
            for name in (m for m in picks if m in wanted):
                boxes = {s.id: picks[name](s, r) for s, r in zip(self.eval, oracles)}
                acc, sec = _timed(lambda: self.predict(
                    wrapped, batch_kwargs=lambda b: {"crop_boxes": [[boxes[s.id]] for s in b]}))
                rows[name] = dict(accuracy=acc, tokens=tokens, train_s=oracle_s if name == "semclip-oracle" else 0.0,
                                  eval_s=sec, trainable=0, **_shown(boxes, self.eval))
            if "semclip-scorer" in wanted:
                rows["semclip-scorer"] = self._scorer(wrapped, oracles, tokens)
        finally:
            wrapped.unwrap()
        for name in (m for m in ZERO_TRAINING if m in wanted):
            rows[name] = self._zero_training(name, oracles, tokens)
        return rows

    def _zero_training(self, name: str, oracles, tokens: int) -> dict:
        """SemClip with nothing trained: the crop of the base's own relative attention, or of CLIP's cosine."""
        import warnings

        from .. import wrap

        config = dataclasses.replace(self.semclip_config(), scorer=ZERO_TRAINING[name])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the world's CLIP, or random: the row says what it gets
            wrapped = wrap(self.model, config, processor=self.processor)
        semclip, chosen, layers = wrapped.adapters["semclip"], {}, set()

        def read(part):
            chosen.update({s.id: c.chosen_boxes[0] for s, c in zip(part, semclip.last_choices)})
            layers.update(layer for m in semclip.last_maps for layer in m.layers)

        try:
            acc, sec = self.predict_batches(wrapped, read)
        finally:
            wrapped.unwrap()
        agree = _mean(chosen[s.id] == r.best_box for s, r in zip(self.eval, oracles))
        return dict(accuracy=acc, tokens=tokens, train_s=0.0, eval_s=sec, trainable=0, **_shown(chosen, self.eval),
                    psi_agreement_with_oracle=agree, **({"layers": sorted(layers)} if layers else {}))

    def psi(self, wrapped) -> dict:
        """SemClip's scorer psi in `wrapped`, trained on oracle labels of training samples once per seed
        (later calls load its weights): {"state", "agreement", "train_s"}."""
        from ..semclip.oracle import oracle
        from ..semclip.train import ScorerExample, cache_features, train_scorer

        c, semclip = self.config, wrapped.adapters["semclip"]
        if self._psi is not None:
            semclip.load_state_dict(self._psi["state"])
            return self._psi
        start = time.perf_counter()
        examples = []
        for s in self.training_samples(0, c.psi_samples):
            r = oracle(wrapped, s.image, s.question, _spoken(s))
            examples.append(ScorerExample(s.image, s.question, r.best, r.boxes, s.id))
        cache = cache_features(semclip.scorer, examples, progress=c.progress)
        history = train_scorer(semclip.scorer, cache, epochs=c.psi_epochs, seed=self.seed, progress=c.progress)
        self._psi = dict(state={k: v.detach().clone() for k, v in semclip.state_dict().items()},
                         agreement=history.agreement[-1], train_s=time.perf_counter() - start)
        return self._psi

    def _scorer(self, wrapped, oracles, tokens: int) -> dict:
        """psi trained on oracle labels of training samples, then SemClip with its choice of crop."""
        c, semclip = self.config, wrapped.adapters["semclip"]
        psi = self.psi(wrapped)
        chosen: dict[str, tuple] = {}
        acc, sec = self.predict_batches(
            wrapped, lambda part: chosen.update({s.id: c.chosen_boxes[0] for s, c in zip(part, semclip.last_choices)}))
        for s, r in list(zip(self.eval, oracles))[: c.examples]:
            self.examples.append(dict(id=s.id, question=s.question, answer=s.answer, target=list(s.box),
                                      scorer=list(chosen[s.id]), oracle=list(r.best_box), image=s.image))
        agree = _mean(chosen[s.id] == r.best_box for s, r in zip(self.eval, oracles))
        return dict(accuracy=acc, tokens=tokens, train_s=psi["train_s"], eval_s=sec,
                    trainable=sum(p.numel() for p in wrapped.trainable_parameters()),
                    **_shown(chosen, self.eval),
                    psi_agreement_with_oracle=agree, psi_train_agreement=psi["agreement"])

    # -- trained adapters ---------------------------------------------------------------------------
    def training_samples(self, start: int, n: int) -> list:
        """Training samples start..start+n-1: fresh from the stream, or cycled from the fixed pool."""
        if not self.pool:
            return make_samples(self.world, n, seed=self.train_seed, start=start)
        return [self.pool[i % len(self.pool)] for i in range(start, start + n)]

    def trained(self, method: str) -> dict:
        from .. import wrap

        c = self.config
        name, variant = split_variant(method)
        torch.manual_seed(self.seed)  # the same init for a method and its control
        configs = adapter_configs(name, readout=c.tgdp_readout, text=c.text)
        chooser = name.endswith("-psi")  # SemClip stacked without crops: its trained scorer picks TG-DP's tile
        wrapped = wrap(self.model, *((self.semclip_config(top_k=0),) if chooser else ()), *configs,
                       processor=self.processor)
        if chooser:
            self.psi(wrapped)
            wrapped.adapters["semclip"].requires_grad_(False)  # trained on oracle labels, then fixed
        if name in ALONE:  # the co-trained parts alone: the zero-initialised TG-FOM stays at its init, the identity
            wrapped.adapters.requires_grad_(False)
        base_parts, saved = cotrained_parts(wrapped, c), None
        params = [p for p in wrapped.trainable_parameters() if p.requires_grad]
        if base_parts:
            saved = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in base_parts]
            for module in base_parts:
                module.requires_grad_(True)
            params += [p for m in base_parts for p in m.parameters()]
        if c.lora:
            from ..train.model import add_lora, lora_config
            from ..train.recipe import LoRASpec

            add_lora(wrapped, lora_config(LoRASpec(r=c.lora, alpha=2 * c.lora, dropout=0.0)))
            params += [p for n, p in wrapped.base_model.named_parameters() if p.requires_grad and "lora_" in n]

        def text(samples):
            if variant == "control":
                return {"guidance_text": [c.control_text] * len(samples)}
            return {"guidance_text": [code_word(s, self.world) for s in samples]} if variant == "code" else {}

        def batch(step):  # the same batches for every method
            samples = self.training_samples(step * c.batch_size, c.batch_size)
            prompts = [chat_prompt(self.processor, s.question) for s in samples]
            images = [s.image for s in samples]
            extra = {"images": images} if wrapped.wants_images else {}  # TG-DP's tiles at full detail
            return lm_batch(self.processor, prompts, [s.answer for s in samples], images), text(samples) | extra

        grads = GradientProbe(wrapped, c.steps)
        try:
            trainable = sum(p.numel() for p in params)
            losses, train_s = _timed(lambda: fit(wrapped, params, batch, steps=c.steps, lr=c.lr, on_grad=grads,
                                            description=f"training {method}", progress=c.progress))
            tgdp, tiles = wrapped.adapters["tgdp"] if "tgdp" in wrapped.adapters else None, {}
            sparse = tgdp is not None and tgdp.sparse

            def read(part):  # sparse TG-DP: each image's chosen tile, as a box on the canvas
                if sparse:
                    scale, processor = tgdp.config.upscale, self.processor.image_processor
                    tiles.update({s.id: wrapped.shim.tile_boxes(s.image, scale, processor)[t[0]]
                                  for s, t in zip(part, tgdp.last_chosen.tolist())})

            acc, eval_s = self.predict_batches(wrapped, read, batch_kwargs=text)
            extra = sum(cfg.num_latents for cfg in adapter_configs(name) if hasattr(cfg, "num_latents"))
        finally:
            wrapped.unwrap()
            for module, state in zip(base_parts, saved or []):  # the next row starts from the same base
                module.load_state_dict(state)
        return dict(accuracy=acc, tokens=self.overview_tokens + extra, train_s=train_s, eval_s=eval_s,
                    trainable=trainable, curve=curve(losses), **grads.report(),
                    **(_shown(tiles, self.eval) if tiles else {}))


def split_variant(method: str) -> tuple[str, str]:
    """("tgfom", "control") from "tgfom-control"; the variant is "" (the question), "control" or "code"."""
    for variant in ("control", "code"):
        if method.endswith(f"-{variant}"):
            return method.removesuffix(f"-{variant}"), variant
    return method, ""


def code_word(sample, world: WorldConfig) -> str:
    """A clean code of where the target is: one word per cell of the world's grid (or of the canvas's 2x2
    quadrants without a grid), sharing nothing with the others or with the questions."""
    target = sample.objects[sample.target] if sample.objects else None
    if target is not None and target.cell is not None:
        return CODE_WORDS[target.cell[0] * world.grid + target.cell[1]]
    x, y = (sample.box[0] + sample.box[2]) / 2, (sample.box[1] + sample.box[3]) / 2
    return CODE_WORDS[2 * int(y >= world.canvas_size / 2) + int(x >= world.canvas_size / 2)]


def cotrained_parts(wrapped, config: EffectConfig) -> list:
    """The base's modules a trained row co-trains beside its adapters: the projector, the tower's last blocks."""
    parts = [wrapped.shim.projector()] if config.projector else []
    blocks = wrapped.shim.vision_blocks()
    if config.tower_blocks > len(blocks):
        raise AdapterError(f"tower_blocks={config.tower_blocks}: the vision tower has {len(blocks)} blocks")
    return parts + (list(blocks[-config.tower_blocks:]) if config.tower_blocks else [])


class GradientProbe:
    """The gradient norms of a row's adapter parameters (diagnosis (d)): all of them, and the part that reads
    the question (TG-FOM's text projection, TIE's keys and values over the text, TG-DP's text layer), at about
    `points` evenly spaced steps; called by `fit` after each backward pass, before clipping."""

    TEXT_PATH = ("text_proj", "to_kv", "text")

    def __init__(self, wrapped, steps: int, points: int = 25):
        named = [(n, p) for n, p in wrapped.adapters.named_parameters() if p.requires_grad]
        self.all = [p for _, p in named]
        self.text = [p for n, p in named if any(k in n for k in self.TEXT_PATH)]
        self.every, self.rows = max(1, steps // points), []

    def __call__(self, step: int) -> None:
        if step % self.every == 0 and self.all:
            self.rows.append([step, _norm(self.all), _norm(self.text)])

    def report(self) -> dict:
        return {"grad_norms": self.rows} if self.rows else {}


def _norm(params) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def curve(losses: list[float], points: int = 50) -> list[list[float]]:
    """The training loss as at most `points` (step, mean loss over the window ending there) pairs."""
    width = max(1, len(losses) // points)
    return [[end, statistics.fmean(losses[end - width:end])] for end in range(width, len(losses) + 1, width)]


def scorer_arch(config: EffectConfig) -> str:
    from ..tiny import tiny_clip

    return config.scorer_arch or tiny_clip()


def _spoken(sample) -> str:
    """The answer as the base says it after "ASSISTANT:": with its leading space. The oracle
    tokenises the answer alone, and this byte-level tokenizer (unlike Llama's) adds no prefix space."""
    return f" {sample.answer}"


def _shown(boxes: dict, samples) -> dict:
    """How often the crops (by sample id) hold the whole target, and at least half of its box."""
    def part(box, t):
        inside = max(0, min(box[2], t[2]) - max(box[0], t[0])) * max(0, min(box[3], t[3]) - max(box[1], t[1]))
        return inside / ((t[2] - t[0]) * (t[3] - t[1]))

    return dict(target_in_crop=_mean(part(boxes[s.id], s.box) == 1 for s in samples),
                target_half_in_crop=_mean(part(boxes[s.id], s.box) >= 0.5 for s in samples))


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def versions() -> dict:
    import transformers

    import vlm_adapters

    return dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
                vlm_adapters=vlm_adapters.__version__, machine=platform.machine(),
                cpu_threads=torch.get_num_threads(), device="cpu")


def summarise(per_seed: list[dict], methods) -> dict:
    out = {}
    for m in methods:
        rows = [r[m] for r in per_seed if m in r]
        accs = [r["accuracy"] for r in rows]
        out[m] = dict(accuracy_mean=statistics.fmean(accs), accuracy_std=statistics.stdev(accs) if len(accs) > 1 else 0.0,
                      tokens=rows[0]["tokens"], train_s=statistics.fmean(r["train_s"] for r in rows),
                      eval_s=statistics.fmean(r["eval_s"] for r in rows), trainable=rows[0]["trainable"])
        for key in ("target_in_crop", "target_half_in_crop", "psi_agreement_with_oracle"):
            if key in rows[0]:
                out[m][key] = statistics.fmean(r[key] for r in rows)
        if "curve" in rows[0]:  # the mean learning curve over seeds
            out[m]["curve"] = [[step, statistics.fmean(r["curve"][i][1] for r in rows)]
                               for i, (step, _) in enumerate(rows[0]["curve"])]
    return out


# What a row of the table is, said under it (the rows present only).
ROW_WORDS = {
    "base": "the frozen base VLM alone",
    "semclip-random": "the base with a random candidate crop after the overview",
    "semclip-scorer": "the crop SemClip's trained scorer psi chooses from the question",
    "semclip-oracle": "the crop that makes the base most likely to give the reference answer: it chooses with the "
                      "answer, so it is an upper bound that no method has at test time, and can beat semclip-target "
                      "by picking crops on which the base happens to be right",
    "semclip-target": "the smallest candidate crop that holds the target: the honest ceiling of a crop chooser "
                      "(it knows where the target is, not the answer)",
    "semclip-attention": "the crop the base's own relative attention chooses (nothing trained)",
    "semclip-clip": "the crop the frozen CLIP's crop-question similarity chooses (nothing trained)",
    "lora": "what the run co-trains (LoRA on the LLM) alone, no adapter",
    "cotrain": "what the run co-trains (LoRA, projector, tower blocks) alone, no adapter",
}
# Said under a table with guided adapter rows, so that a row equal to its control does not read as a bug
EVIDENCE = ("TG-FOM, TIE and TG-DP's own text guidance have shown no effect over their text-ablated controls so far, "
            "trained alone or co-trained with the projector and LoRA (benchmarks/RESULTS.md, Effect VI): a guided "
            "row equal to its control is the measured result, not a fault.")


def row_words(method: str) -> str:
    if method in ROW_WORDS:
        return ROW_WORDS[method]
    if method.endswith("-control"):
        return f"{method.removesuffix('-control')} with its text input a constant string (the question ablated)"
    if method.endswith("-code"):
        return f"{method.removesuffix('-code')} with its text input a clean code of the target's cell (diagnosis)"
    sparse = " on its most relevant tile only" if "-k1" in method else ""
    chooser = " (the tile chosen by psi)" if "-psi" in method else ""
    return f"{method.split('-')[0]} trained on the frozen base (beside what the run co-trains, if any){sparse}{chooser}"


def table(summary: dict, seeds: int) -> str:
    heading = f"accuracy (mean ± std, {seeds} seeds)" if seeds > 1 else "accuracy (1 seed)"
    lines = [f"| method | {heading} | visual tokens / sample | trainable params | train s | eval s | "
             "target in crop (whole / half) |", "|---|---|---|---|---|---|---|"]
    for m, r in summary.items():
        crop = f"{r['target_in_crop']:.0%} / {r['target_half_in_crop']:.0%}" if "target_in_crop" in r else ""
        acc = f"{r['accuracy_mean']:.1%}" + (f" ± {r['accuracy_std']:.1%}" if seeds > 1 else "")
        lines.append(f"| {m} | {acc} | {r['tokens']} | "
                     f"{r['trainable']:,} | {r['train_s']:.0f} | {r['eval_s']:.0f} | {crop} |")
    lines += ["", "Rows: one method each, all scored on the same held-out samples with the same frozen base:",
              *(f"- {m}: {row_words(m)}" for m in summary)]
    if any(split_variant(m)[0] in ("tgfom", "tie", "tgdp") for m in summary):
        lines += ["", EVIDENCE]
    return "\n".join(lines)


def recovery(summary: dict) -> float | None:
    """The share of the honest ceiling's gain over the base that SemClip's trained scorer recovers:
    (scorer - base) / (target crop - base); None without those rows or without a gain to recover."""
    if not {"base", "semclip-scorer", "semclip-target"} <= set(summary):
        return None
    base, scorer, ceiling = (summary[m]["accuracy_mean"] for m in ("base", "semclip-scorer", "semclip-target"))
    return (scorer - base) / (ceiling - base) if ceiling > base else None


def report(results: dict, command: str) -> str:
    """A markdown page of one run: command, machine and versions, the base's bar check, the table."""
    c, v, base = results["config"], results["versions"], results["base"]
    views = ", ".join(f"{k} {a:.1%}" for k, a in base["view_accuracy"].items())
    data = (f"a fixed pool of {c['train_samples']} samples" if c["train_samples"]
            else "fresh samples every step (no repeats)")
    return "\n".join([
        f"# Effect benchmark: {c['base']['regime']} regime", "", f"Command: `{command}`", "",
        f"Machine: {v['machine']}, {v['cpu_threads']} torch CPU thread(s), no GPU. Python {v['python']}, "
        f"torch {v['torch']}, transformers {v['transformers']}, vlm_adapters {v['vlm_adapters']}. "
        f"Wall time {results['wall_s'] / 60:.1f} min.", "",
        f"World: {json.dumps(c['world'])}.", "",
        f"Base VLM ({c['base']['size']} LLaVA trained from scratch, {c['base']['regime']} regime, "
        f"{base['steps_run']} steps, then frozen): accuracy by view on held-out canvases: {views}.", "",
        f"Per seed: {c['eval_samples']} held-out samples{_objects_words(c)}; adapters trained {c['steps']} steps "
        f"of batch {c['batch_size']} (lr {c['lr']:g}{_training_words(c)}) on {data}; psi trained on oracle labels of "
        f"{c['psi_samples']} samples; control rows give the adapter the constant text {c['control_text']!r}.", "",
        table(results["summary"], c["seeds"]), "", *_recovery_line(results["summary"])])


def _objects_words(config: dict) -> str:
    """The adapters' canvases, where they hold fewer objects than the base's world."""
    n = config.get("objects")
    return "" if n is None else f" and training samples of {n} object{'s' * (n > 1)} a canvas (the base's world: " \
        f"{config['world']['num_objects']})"


def _training_words(config: dict) -> str:
    """What trains beside the adapters (LoRA, the projector, tower blocks) and TG-DP's readout, when changed."""
    r, readout, blocks = config.get("lora", 0), config.get("tgdp_readout", "connector"), config.get("tower_blocks", 0)
    parts = ([f"LoRA r={r} on the LLM"] if r else []) + (["the projector"] if config.get("projector") else []) \
        + ([f"the vision tower's last {blocks} block(s)"] if blocks else [])
    return ((f", each co-training {' and '.join(parts)}; the row 'cotrain' trains those alone" if parts else "")
            + (f"; TG-DP readout {readout!r}" if readout != "connector" else ""))


def _recovery_line(summary: dict) -> list[str]:
    share = recovery(summary)
    return [] if share is None else [
        f"SemClip's trained scorer recovers {share:.0%} of the honest ceiling's gain over the base (the ceiling: "
        "the base with the smallest candidate crop that holds the target, `semclip-target`).", ""]


def run(config: EffectConfig, *, out: Path | None = None, png: Path | None = None, echo=print) -> dict:
    """Run the benchmark; write JSON (`out`) and the plot (`png`); return the results."""
    from .plot import draw

    start = time.perf_counter()
    model, processor, path, info = load_or_train(config.world, config.base, config.cache, progress=config.progress)
    views = info["view_accuracy"]
    echo(f"base VLM {path} (ready in {time.perf_counter() - start:.0f} s, trained {info['steps_run']} steps); "
         "accuracy on held-out canvases by view: " + ", ".join(f"{k} {v:.1%}" for k, v in views.items())
         + f"\n({views_legend(views)})")
    check_bar(views, config.base, f" at {path}")
    weights = None
    if config.scorer_clip == "world" and any(m in SEMCLIP or "-psi" in m for m in config.methods):
        from .clip import clip_weights

        weights = str(clip_weights(config.world, scorer_arch(config), cache_root(config.cache),
                                   scales=config.base.scales, steps=config.clip_steps, progress=config.progress))
    per_seed, examples = [], []
    seeds = list(range(config.first_seed, config.first_seed + config.seeds))
    for seed in seeds:
        runner, rows = SeedRun(config, model, processor, seed, weights), {}
        if "base" in config.methods:
            rows["base"] = runner.base()
        wanted = [m for m in SEMCLIP if m in config.methods]
        if wanted:
            rows.update(runner.semclip(wanted))
        for method in config.methods:
            if method not in rows and method != "base" and method not in SEMCLIP:
                rows[method] = runner.trained(method)
        per_seed.append({m: rows[m] for m in config.methods if m in rows})
        examples += runner.examples if seed == seeds[0] else []
        echo(f"seed {seed}: " + ", ".join(f"{m} {r['accuracy']:.1%}" for m, r in per_seed[-1].items()))
    summary = summarise(per_seed, [m for m in config.methods])
    results = dict(provenance=provenance(base=base_record(model), settings=_config_dict(config)),
                   config=_config_dict(config), versions=versions(),
                   base=dict(path=str(path), view_accuracy=views, steps_run=info["steps_run"], history=info["history"]),
                   scorer_weights=weights, scorer_recovery=recovery(summary),
                   seeds=seeds, per_seed=per_seed, summary=summary, wall_s=time.perf_counter() - start,
                   examples=[{k: v for k, v in e.items() if k != "image"} for e in examples])
    echo("\n".join([table(summary, config.seeds), *_recovery_line(summary)]))
    if out is not None:
        from ..atomic import atomic_write_text

        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(results, indent=1))
        echo(f"results: {out}")
    if png is not None:
        draw(summary, examples, png, title=f"{config.eval_samples} held-out samples per seed", seeds=config.seeds,
             chance=1 / len(answers(config.world)))
        echo(f"plot: {png}")
    echo(f"wall time: {results['wall_s']:.0f} s")
    return results


DEFAULTS = {f.name: f.default for f in dataclasses.fields(EffectConfig) if f.default is not dataclasses.MISSING}
PER_PART = ("seeds", "first_seed", "cache", "progress")  # settings that may differ between the parts of one run


def combine(parts: list[dict]) -> dict:
    """One result from the parts of a run split by seed (`first_seed`): the same settings and base,
    disjoint seeds; per-seed rows in seed order, summary and recovery recomputed, wall times summed."""
    if not parts:
        raise AdapterError("combine needs at least one results file")
    first = parts[0]
    same = {k: v for k, v in first["config"].items() if k not in PER_PART}
    for part in parts[1:]:
        other = {k: v for k, v in part["config"].items() if k not in PER_PART}
        changed = sorted(k for k in same.keys() | other.keys()  # a setting added later: its default in older parts
                         if same.get(k, DEFAULTS.get(k)) != other.get(k, DEFAULTS.get(k)))
        if changed or part["base"]["path"] != first["base"]["path"]:
            raise AdapterError(f"these results are not parts of one run: they differ in {changed or ['the base']}")
    rows = sorted((seed, row) for part in parts for seed, row in zip(part.get("seeds", []), part["per_seed"]))
    seeds = [seed for seed, _ in rows]
    if len(set(seeds)) < len(seeds) or len(seeds) != sum(len(p["per_seed"]) for p in parts):
        raise AdapterError(f"the parts must hold disjoint seeds (each written with --first-seed), got seeds {seeds}")
    per_seed = [row for _, row in rows]
    summary = summarise(per_seed, list(first["summary"]))
    config = dict(first["config"], seeds=len(seeds), first_seed=seeds[0])
    return dict(first, config=config, seeds=seeds, per_seed=per_seed, summary=summary,
                scorer_recovery=recovery(summary), wall_s=sum(p["wall_s"] for p in parts),
                parts=[dict(seeds=p.get("seeds"), command=p["provenance"].get("command")) for p in parts])


def _config_dict(config: EffectConfig) -> dict:
    d = dataclasses.asdict(config)
    d["world"], d["cache"] = config.world.to_dict(), str(config.cache) if config.cache else None
    d["methods"] = list(config.methods)
    return d
