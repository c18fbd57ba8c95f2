"""Training recipes: YAML validated into dataclasses, with dotted command-line overrides.

A recipe names a model, the adapters (each built through the method registry), what else trains,
the data, the optimisation and the output. Every key is checked (parse.py): an unknown one is an
error that names the closest valid key. Relative paths in a recipe file are relative to that file
(`paths_relative_to`); those of a shipped recipe and of `--set` overrides to the working directory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..bases import LoadOptions
from ..config import AdapterConfig, config_from_dict, registered_methods
from ..errors import AdapterError, shorten
from ..readers import load_yaml, read_text
from .parse import apply_overrides, check, check_choice, coerce_adapter, parse, require

TASKS = ("adapters", "semclip_scorer")
DTYPES = ("auto", "float32", "bfloat16", "float16")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
ON_BAD_RECORD = ("skip", "error")
MAX_RECIPE_BYTES = 1_000_000  # a recipe is a few KB; a bigger file is the wrong one (and slow to parse)
MAX_LR = 1.0  # a larger learning rate blows the weights up (1e10 gives 1e10-sized weights after one step)


@dataclass
class ModelSpec:
    """The frozen base: a hub id or a local directory saved with save_pretrained.

    dtype: weights dtype; "auto" follows train.precision (bf16 -> bfloat16, fp16 -> float16,
    fp32 -> float32). init_from: start the trainable weights from an earlier run's output
    directory or an adapter directory (e.g. stage 2 from stage 1). For big bases
    (vlm_adapters.bases): device_map ("auto", a device, or a map module -> device / "disk"),
    offload_folder (for "disk"), quantization ("4bit", "8bit" or BitsAndBytesConfig fields; a
    CUDA GPU only), attn_implementation ("sdpa", "eager", "flash_attention_2", ...)."""

    name_or_path: str = ""
    dtype: str = "auto"
    revision: str | None = None
    init_from: str | None = None
    device_map: Any = None
    offload_folder: str | None = None
    quantization: Any = None
    attn_implementation: str | None = None

    def load_options(self) -> LoadOptions:
        """The big-base loading options, checked (a bad one is an AdapterError naming model.<key>)."""
        try:
            return LoadOptions(self.device_map, self.quantization, self.attn_implementation, self.offload_folder)
        except AdapterError as err:
            raise AdapterError(f"model.{err}") from None


@dataclass
class LoRASpec:
    """LoRA (peft) on the LLM's linear layers named in target_modules (never the vision tower)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class TrainableSpec:
    """What trains besides the adapters: the multimodal projector, LoRA on the LLM."""

    projector: bool = False
    lora: LoRASpec | None = None


@dataclass
class DataSpec:
    """LLaVA-format conversation JSON (or JSONL) and the root its `image` paths are relative to.
    allow_outside_root: accept image paths that leave image_root (`..`, absolute paths elsewhere)."""

    json: str = ""
    image_root: str = "."
    allow_outside_root: bool = False
    on_bad_record: str = "skip"
    check_images: bool = True
    max_length: int | None = None
    num_workers: int = 0


@dataclass
class TrainSpec:
    """Optimisation. batch_size is per process; the global batch is batch_size x grad_accum x
    processes. Give global_batch_size to derive grad_accum from the number of processes.
    max_steps (optimizer steps) overrides epochs."""

    optimizer: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0
    schedule: str = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float | None = 1.0
    batch_size: int = 1
    grad_accum: int | None = None
    global_batch_size: int | None = None
    epochs: int = 1
    max_steps: int | None = None
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    seed: int = 42
    find_unused_parameters: bool = False


@dataclass
class OutputSpec:
    """Where checkpoints go (dir/checkpoints/step-N), how often, and how many are kept (0: all)."""

    dir: str = ""
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10


@dataclass
class Recipe:
    """A whole recipe. task "adapters" trains adapters on a frozen VLM; task "semclip_scorer"
    trains SemClip's relevance scorer (one `semclip` adapter, the VLM untouched)."""

    task: str = "adapters"
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    adapters: list[dict] = field(default_factory=list)
    trainable: TrainableSpec = field(default_factory=TrainableSpec)
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    output: OutputSpec = field(default_factory=OutputSpec)

    def adapter_configs(self) -> list[AdapterConfig]:
        """Build each adapter's config through the registry (unknown method or key: AdapterError)."""
        out = []
        for i, raw in enumerate(self.adapters):
            try:
                out.append(config_from_dict(coerce_adapter(raw, f"adapters.{i}")))
            except AdapterError as err:
                raise AdapterError(f"adapters.{i} (method {shorten(raw.get('method'))}): {err}") from None
        return out

    def pending_methods(self) -> list[str]:
        """Methods this recipe names that are not registered in this installation."""
        return sorted({a["method"] for a in self.adapters} - set(registered_methods()))

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.pending_methods():
            data["adapters"] = [cfg.to_dict() for cfg in self.adapter_configs()]
        return data

    def validate(self, check_adapters: bool = True) -> None:
        check_choice(self.task, TASKS, "task")
        require(self.model.name_or_path, "model.name_or_path", "a hub id or a local model directory")
        check_choice(self.model.dtype, DTYPES, "model.dtype")
        self.model.load_options()
        if not self.adapters:
            raise AdapterError("adapters: give at least one adapter, e.g. [{method: tgfom}]")
        for i, raw in enumerate(self.adapters):
            if not isinstance(raw, dict) or not isinstance(raw.get("method"), str):
                raise AdapterError(f"adapters.{i}: each adapter is a mapping with a `method`, got {shorten(raw)}")
        if check_adapters:
            self.adapter_configs()
        if self.task == "semclip_scorer":
            if [a["method"] for a in self.adapters] != ["semclip"]:
                raise AdapterError("task semclip_scorer trains one adapter: adapters: [{method: semclip, ...}]")
            if self.trainable.projector or self.trainable.lora:
                raise AdapterError("task semclip_scorer never trains the VLM: set trainable.projector=false, "
                                   "trainable.lora=null")
        if (lora := self.trainable.lora) is not None:
            check(lora.r >= 1 and lora.alpha > 0 and 0 <= lora.dropout < 1, "trainable.lora",
                   "r >= 1, alpha > 0 and 0 <= dropout < 1", lora)
            check(bool(lora.target_modules), "trainable.lora.target_modules", "a non-empty list of layer names",
                   lora.target_modules)
        d = self.data
        require(d.json, "data.json", "the LLaVA-format conversation JSON file")
        check_choice(d.on_bad_record, ON_BAD_RECORD, "data.on_bad_record")
        check(d.max_length is None or d.max_length >= 8, "data.max_length", "null or >= 8", d.max_length)
        check(d.num_workers >= 0, "data.num_workers", ">= 0", d.num_workers)
        t = self.train
        check_choice(t.optimizer, OPTIMIZERS, "train.optimizer")
        check_choice(t.schedule, SCHEDULES, "train.schedule")
        check_choice(t.precision, PRECISIONS, "train.precision")
        check(math.isfinite(t.lr) and 0 < t.lr <= MAX_LR, "train.lr", f"a finite number in (0, {MAX_LR:g}] "
              "(adapters train well at 1e-5 to 1e-3)", t.lr)
        check(0 <= t.weight_decay < math.inf, "train.weight_decay", "a finite number >= 0", t.weight_decay)
        check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", "two numbers in [0, 1)", t.betas)
        check(0 < t.eps < math.inf and 0 <= t.momentum < math.inf, "train.eps/momentum",
              "finite, eps > 0, momentum >= 0", (t.eps, t.momentum))
        check(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "in [0, 1)", t.warmup_ratio)
        check(t.max_grad_norm is None or t.max_grad_norm > 0, "train.max_grad_norm", "null or > 0", t.max_grad_norm)
        check(t.batch_size >= 1, "train.batch_size", ">= 1", t.batch_size)
        check(t.grad_accum is None or t.grad_accum >= 1, "train.grad_accum", "null or >= 1", t.grad_accum)
        check(t.global_batch_size is None or t.global_batch_size >= t.batch_size, "train.global_batch_size",
               f"null or >= train.batch_size ({t.batch_size})", t.global_batch_size)
        check(t.epochs >= 1, "train.epochs", ">= 1", t.epochs)
        check(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "null or >= 1", t.max_steps)
        o = self.output
        require(o.dir, "output.dir", "the directory checkpoints are written to")
        check(o.save_every >= 1, "output.save_every", ">= 1", o.save_every)
        check(o.keep_last >= 0, "output.keep_last", ">= 0 (0 keeps every checkpoint)", o.keep_last)
        check(o.log_every >= 1, "output.log_every", ">= 1", o.log_every)

    def grad_accum_for(self, num_processes: int) -> int:
        """Gradient accumulation steps for this many processes (from global_batch_size if given)."""
        t = self.train
        if t.global_batch_size is None:
            return t.grad_accum or 1
        per_step = t.batch_size * num_processes
        accum, rest = divmod(t.global_batch_size, per_step)
        if rest or accum < 1:
            raise AdapterError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of train.batch_size "
                f"({t.batch_size}) x {num_processes} processes: change train.batch_size or the process count")
        if t.grad_accum is not None and t.grad_accum != accum:
            raise AdapterError(
                f"train.grad_accum={t.grad_accum} but global_batch_size {t.global_batch_size} / (batch_size "
                f"{t.batch_size} x {num_processes} processes) = {accum}: set only one of them")
        return accum


# -- loading ---------------------------------------------------------------------------------------
def shipped_recipes() -> dict[str, Any]:
    """Recipes shipped with the package: name -> resource (a file-like path)."""
    root = resources.files("vlm_adapters.recipes")
    return {p.name[: -len(".yaml")]: p for p in sorted(root.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".yaml")}


def accelerate_configs() -> dict[str, Path]:
    """The accelerate config files shipped beside the recipes (ddp, fsdp, deepspeed-zero2/3): name -> path."""
    root = Path(str(resources.files("vlm_adapters.recipes") / "accelerate"))
    return {p.stem: p for p in sorted(root.glob("*.yaml"))}


def read_recipe_yaml(source: str | Path) -> tuple[str, dict]:
    """(where it came from, the raw mapping) for a YAML path or a shipped recipe's name."""
    where, text = recipe_text(source)
    data = load_yaml(text, where)
    if not isinstance(data, dict):
        raise AdapterError(f"{where}: a recipe is a YAML mapping with model, adapters, data, train, output")
    return where, data


def recipe_text(source: str | Path) -> tuple[str, str]:
    """(where it came from, its text) for a YAML path or a shipped recipe's name."""
    path = Path(source)
    if path.is_file():
        text, where = read_text(path, "recipe", max_bytes=MAX_RECIPE_BYTES), str(path)
    else:
        shipped = shipped_recipes()
        name = str(source).removesuffix(".yaml")
        if name not in shipped:
            hint = difflib.get_close_matches(name, list(shipped), n=1)
            did = f" (did you mean {shorten(hint[0])}?)" if hint else ""
            raise AdapterError(f"no recipe file {shorten(str(source))} and no shipped recipe of that name{did}; "
                               f"shipped: {', '.join(shipped)}")
        text, where = shipped[name].read_text(), f"shipped recipe {shorten(name)}"
    return where, text


def paths_relative_to(data: dict, root: Path) -> dict:
    """A copy of the recipe mapping with its relative paths made absolute from `root` (the recipe's
    folder): data.json, data.image_root, output.dir and model.init_from always; model.name_or_path
    and the adapters' scorer_weights, text.weights and text.name only when they exist there (else
    they are hub ids or architecture names)."""
    def fix(mapping, keys, only_if_exists: bool = False) -> None:
        if not isinstance(mapping, dict):
            return
        for key in keys:
            value = mapping.get(key)
            if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
                if (root / value).exists() or not only_if_exists:
                    mapping[key] = str(root / value)

    data = copy.deepcopy(data)
    fix(data.get("data"), ("json", "image_root"))
    fix(data.get("output"), ("dir",))
    fix(data.get("model"), ("init_from",))
    fix(data.get("model"), ("name_or_path",), only_if_exists=True)
    for adapter in data.get("adapters") if isinstance(data.get("adapters"), list) else []:
        fix(adapter, ("scorer_weights",), only_if_exists=True)
        fix(adapter.get("text") if isinstance(adapter, dict) else None, ("weights", "name"), only_if_exists=True)
    return data


def load_recipe(source: str | Path, overrides: list[str] | tuple = (), check_adapters: bool = True) -> Recipe:
    """Read, override (`["train.lr=1e-4", ...]`) and validate a recipe (a path or a shipped name).

    check_adapters=False skips building the adapter configs (for methods not installed yet)."""
    where, data = read_recipe_yaml(source)
    if Path(source).is_file():
        data = paths_relative_to(data, Path(source).resolve().parent)
    data = apply_overrides(data, overrides)
    try:
        recipe = parse(Recipe, data, "")
        recipe.validate(check_adapters=check_adapters)
    except AdapterError as err:
        raise AdapterError(f"{where}: {err}") from None
    return recipe


def recipe_from_dict(data: dict, check_adapters: bool = True) -> Recipe:
    recipe = parse(Recipe, data, "")
    recipe.validate(check_adapters=check_adapters)
    return recipe
