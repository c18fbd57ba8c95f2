"""The model side of training: load the base, wrap it, add what else trains, save/restore weights.

Trainable weights live in three places, each saved beside the adapters in an adapter directory:
the adapters (`save_adapters`: adapter_config.json + adapter_model.safetensors), the projector
(`projector.safetensors`, when trainable.projector) and LoRA on the LLM (`lora/`, peft's
adapter_config.json + adapter_model.safetensors, when trainable.lora).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..bases import LoadOptions
from ..errors import AdapterError, shorten
from ..io import (  # noqa: F401  (is_adapter_dir and the LoRA file names: importable from here as before)
    CONFIG_NAME, LORA_CONFIG, LORA_DIR, LORA_WEIGHTS, PROJECTOR_FILE, adapter_state, atomic_write, check_dtypes,
    is_adapter_dir, read_lora_config, read_weights, write_adapter_files,
)
from ..provenance import note_revision
from ..weights import check_shapes
from ..wrap import AdaptedModel, load_adapters, wrap
from .recipe import LoRASpec, Recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str, option: str = "--dtype") -> torch.dtype:
    """The torch dtype named `name` (float32, bfloat16, float16); a clear error naming `option` otherwise."""
    if name not in DTYPES:
        raise AdapterError(f"{option} {shorten(name)}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device: str) -> str:
    """`auto` is cuda when a GPU is present, else cpu; any other name (cpu, cuda, cuda:1) is kept, once it
    is known to be on this machine (a one-line error otherwise)."""
    from ..devices import check_available

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_available(device)
    return device


def load_base(name_or_path: str, dtype: str = "float32", revision: str | None = None, *,
              allow_pickle: bool | None = None, options: LoadOptions | None = None):
    """(model, processor) from a hub id or a directory written by save_pretrained. Weights are read from
    safetensors files only, unless `allow_pickle` (default: VLM_ADAPTERS_ALLOW_PICKLE=1 in the environment):
    a pickle (pytorch_model.bin) can run code when it is loaded. `options`: device_map, quantization,
    attn_implementation, offload_folder (vlm_adapters.bases)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..hub import load_errors, require_model

    require_model(name_or_path, revision=revision)  # not local, not cached and no network: one line, at once
    if allow_pickle is None:
        allow_pickle = os.environ.get(ALLOW_PICKLE, "").upper() in ("1", "TRUE", "YES", "ON")
    if not allow_pickle and _pickle_only(Path(name_or_path)):
        raise AdapterError(_PICKLE_ONLY.format(name_or_path))
    extra = (options or LoadOptions()).from_pretrained_kwargs()
    if "device_map" in extra:
        check_device_map(name_or_path, revision, extra["device_map"])
    try:
        model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=DTYPES[dtype], revision=revision,
                                                            use_safetensors=None if allow_pickle else True, **extra)
        processor = AutoProcessor.from_pretrained(name_or_path, revision=revision)
        note_revision(model, revision)  # recorded in every output's provenance
    except (*load_errors(), ImportError) as err:
        if not allow_pickle and "safetensors" in str(err) and "file named" in str(err):  # transformers' words
            raise AdapterError(_PICKLE_ONLY.format(name_or_path)) from None
        settings = f"check {', '.join(sorted(extra))}, or " if extra else ""
        raise AdapterError(
            f"cannot load model {shorten(name_or_path)} ({str(err).splitlines()[0]}): {settings}give a local directory "
            "saved with save_pretrained (model and processor), or a hub id that is cached or reachable") from None
    return model, processor


def check_device_map(name_or_path: str, revision, device_map) -> None:
    """Before the weights load: every device in `device_map` is on this machine, and each module it names
    is one of the model's (transformers ignores unknown names without a word), read from an empty
    (meta-device) model built from the config."""
    from ..devices import check_available

    values = device_map.values() if isinstance(device_map, dict) else [device_map]
    for value in values:
        check_available(value, "device_map")
    if not isinstance(device_map, dict):
        return
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision)
        with torch.device("meta"):
            skeleton = AutoModelForImageTextToText.from_config(config)
    except Exception:  # noqa: BLE001 (the load below reports a model that cannot be built, in its words)
        return
    names = {n for n, _ in skeleton.named_modules()} | {n for n, _ in skeleton.named_parameters()}
    unknown = [k for k in device_map if k not in names]
    if unknown:
        import difflib

        hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
        listing = "; ".join(f"{shorten(k)}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        top = sorted({n.split(".")[0] for n in names if n})
        raise AdapterError(f"device_map names modules {type(skeleton).__name__} does not have: {listing}; its "
                           f"modules start with {top} (\"\" is the whole model)")


ALLOW_PICKLE = "VLM_ADAPTERS_ALLOW_PICKLE"
_PICKLE_ONLY = ("model {0!r} has no safetensors weights (only a pickle such as pytorch_model.bin, which can run code "
                "when loaded): re-save it with save_pretrained (it writes model.safetensors), or set "
                f"{ALLOW_PICKLE}=1 if you trust it")


def _pickle_only(directory: Path) -> bool:
    """A local model directory with pickle weights (*.bin, *.pt, *.pth) and no *.safetensors."""
    if not directory.is_dir() or any(directory.glob("*.safetensors")):
        return False
    return any(any(directory.glob(pattern)) for pattern in ("*.bin", "*.pt", "*.pth"))


def model_dtype(recipe: Recipe) -> str:
    spec = recipe.model.dtype
    return PRECISION_DTYPE[recipe.train.precision] if spec == "auto" else spec


def lora_config(spec: LoRASpec):
    """A peft LoraConfig on the LLM only: target_modules are matched under `language_model`."""
    from peft import LoraConfig

    names = "|".join(sorted(set(spec.target_modules)))
    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=rf".*language_model\..*\.({names})")


def build_trainable(model, processor, recipe: Recipe) -> AdaptedModel:
    """Wrap the base with the recipe's adapters, then add LoRA and unfreeze the projector if asked.
    With mixed precision the trainable weights are kept in float32 (master weights)."""
    wrapped = wrap(model, *recipe.adapter_configs(), processor=processor)
    if recipe.trainable.lora is not None:
        add_lora(wrapped, lora_config(recipe.trainable.lora))
    if recipe.trainable.projector:
        wrapped.shim.projector().requires_grad_(True)
    if recipe.train.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    if recipe.train.precision != "fp32":
        for _, param in trainable_parameters(wrapped):
            param.data = param.data.float()
    return wrapped


def add_lora(wrapped: AdaptedModel, config) -> None:
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(config, wrapped.base_model)
    except ValueError as err:
        raise AdapterError(f"trainable.lora: {err}; name the LLM's linear layers in target_modules") from None


def trainable_parameters(wrapped: AdaptedModel) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of everything that trains, in a fixed order: the adapters
    (`wrapped.trainable_parameters()`), then the projector, then LoRA. Anything else with
    requires_grad is an error: the base must stay frozen."""
    names = {id(p): n for n, p in wrapped.named_parameters()}
    chosen = [(names[id(p)], p) for p in wrapped.trainable_parameters()]
    chosen += [(f"projector.{n}", p) for n, p in wrapped.shim.projector().named_parameters() if p.requires_grad]
    chosen += [(n, p) for n, p in wrapped.base_model.named_parameters() if p.requires_grad and "lora_" in n]
    ids = {id(p) for _, p in chosen}
    stray = [n for n, p in wrapped.named_parameters() if p.requires_grad and id(p) not in ids]
    if stray:
        raise AdapterError(f"base parameters would train: {stray[:5]}; only adapters, the projector "
                           "(trainable.projector) and LoRA (trainable.lora) may train")
    return chosen


# -- saving and restoring --------------------------------------------------------------------------
def save_trainable(wrapped: AdaptedModel, directory: Path, adapter_state: dict | None = None) -> None:
    """Write the adapter directory (plus projector.safetensors and lora/ when they train) into
    `directory`, a checkpoint's staging directory (committed as a whole by checkpoint.commit).
    adapter_state: the adapters' full state dict when the live one is sharded (FSDP, ZeRO-3)."""
    directory = Path(directory)
    write_adapter_files(wrapped, directory, adapter_state)
    projector = wrapped.shim.projector()
    if any(p.requires_grad for p in projector.parameters()):
        _write(directory / PROJECTOR_FILE, projector.state_dict())
    if hasattr(wrapped.base_model, "peft_config"):
        from peft import get_peft_model_state_dict

        lora_dir = directory / LORA_DIR
        wrapped.base_model.peft_config["default"].save_pretrained(lora_dir)  # peft's adapter_config.json
        _write(lora_dir / LORA_WEIGHTS, get_peft_model_state_dict(wrapped.base_model))


def _write(path: Path, tensors: dict) -> None:
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def restore_trainable(wrapped: AdaptedModel, directory: Path) -> None:
    """Load the weights of an adapter directory into an already built trainable model (same recipe)."""
    directory = Path(directory)
    _load_into(wrapped.adapters, directory / "adapter_model.safetensors", "adapters", adapter_state(wrapped))
    if (directory / PROJECTOR_FILE).is_file():
        if not any(p.requires_grad for p in wrapped.shim.projector().parameters()):
            raise AdapterError(f"{directory} holds a trained projector: set trainable.projector=true to keep it "
                               "(a frozen copy would not be saved with the new checkpoints)")
        _load_into(wrapped.shim.projector(), directory / PROJECTOR_FILE, "projector")
    if (directory / LORA_DIR / LORA_WEIGHTS).is_file():
        if not hasattr(wrapped.base_model, "peft_config"):
            raise AdapterError(f"{directory} holds LoRA weights but the recipe has no trainable.lora: "
                               "set trainable.lora as in the run that wrote it")
        _set_lora(wrapped, directory / LORA_DIR / LORA_WEIGHTS)


def _load_into(module: torch.nn.Module, file: Path, what: str, own: dict | None = None) -> None:
    """Load `file` into `module`; `own`: the part of its state that is saved (default: all of it)."""
    state = _read(file)
    own = module.state_dict() if own is None else own
    wrong = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
    if wrong:
        raise AdapterError(f"{file} does not fit this recipe's {what} (differs in {wrong[:5]}); "
                           "use the same adapters and model as the run that wrote it")
    check_dtypes(state, own, file)
    module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)


def _set_lora(wrapped: AdaptedModel, file: Path) -> None:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    state = _read(file)
    own = get_peft_model_state_dict(wrapped.base_model)
    check_shapes({k: v for k, v in state.items() if k in own}, own, file)
    check_dtypes(state, own, file)
    result = set_peft_model_state_dict(wrapped.base_model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise AdapterError(f"{file} does not fit the LoRA of this recipe (missing {missing[:3]}, "
                           f"unexpected {list(result.unexpected_keys)[:3]}); use the same trainable.lora")


def _read(file: Path) -> dict:
    return read_weights(file)


def load_trained(model, directory, processor=None, adapter_name: str = "default") -> AdaptedModel:
    """Everything a training run saved in `directory`, on top of `model`: the adapters
    (load_adapters, which checks the base's fingerprint), the projector and LoRA if present.
    `directory` is an adapter directory, a checkpoint, or a training output directory (its latest
    checkpoint). `model` may be a wrapper: the adapters become its set `adapter_name`."""
    from .checkpoint import resolve_adapter_dir

    directory = resolve_adapter_dir(directory)
    changes_base = [f for f in (PROJECTOR_FILE, LORA_DIR) if (directory / f).exists()]
    if isinstance(model, AdaptedModel) and changes_base:
        raise AdapterError(f"{directory} holds {' and '.join(changes_base)}, which change the base that every "
                           "adapter set shares: load it as a model's first set (AdaptedModel.from_pretrained)")
    wrapped = load_adapters(model, directory, processor=processor, adapter_name=adapter_name)
    if (directory / PROJECTOR_FILE).is_file():
        _load_into(wrapped.shim.projector(), directory / PROJECTOR_FILE, "projector")
    if (directory / LORA_DIR / LORA_CONFIG).is_file():
        from peft import LoraConfig

        read_lora_config(directory)  # a clear error for a file that is not peft's
        add_lora(wrapped, LoraConfig.from_pretrained(str(directory / LORA_DIR)))
        _set_lora(wrapped, directory / LORA_DIR / LORA_WEIGHTS)
    return wrapped
