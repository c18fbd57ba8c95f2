"""The model an evaluation scores: a base VLM, plain or with an adapter directory and/or SemClip settings.

`plan(...)` checks everything that can be checked without loading weights (the adapter directory,
the SemClip settings, the base model's family from its config.json), so a bad argument is an error
before any work starts; `load(plan)` then builds (model, processor).

SemClip settings are SemClipConfig fields (a dict or a JSON object string; True for the defaults).
Alone they wrap the base with a fresh SemClip; with an adapter directory that holds a SemClip,
they override its inference knobs (top_k, scales, overlap, min_crop_size).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..adapters import SemClipConfig
from ..config import config_from_dict
from ..errors import AdapterError, shorten
from ..io import read_config
from ..provenance import stored_base

# SemClip fields that hold no weights
INFERENCE_KNOBS = ("top_k", "scales", "overlap", "min_crop_size", "generic_question", "attention_layers",
                   "attention_depth", "attention_from")


@dataclass
class Plan:
    pretrained: str
    adapters: Path | None = None  # a resolved adapter directory
    semclip: dict | None = None  # SemClip settings (validated)


def semclip_settings(value) -> dict | None:
    """None/False/"": no SemClip; True: the defaults; a dict or a JSON object string: SemClipConfig fields."""
    if isinstance(value, str) and value.strip():
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as err:
            raise AdapterError(f"semclip={shorten(value)} is not JSON ({err}): give true or an object such as "
                               '\'{"top_k": 2, "scales": [[2, 2]]}\'') from None
    if value is None or value is False or value == "":
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise AdapterError(f"semclip settings must be true or a JSON object of SemClipConfig fields, got {shorten(value)}")
    config_from_dict({"method": "semclip", **value})  # unknown keys and bad values are errors here
    return dict(value)


def check_model(pretrained: str) -> None:
    """AdapterError unless `pretrained` (hub id or directory) is of a supported family; reads only its config."""
    from transformers import AutoConfig

    from vlm_adapters.integrations import SHIMS

    from ..hub import load_errors, require_model

    require_model(pretrained)  # not local, not cached and no network: one line, at once
    try:
        config = AutoConfig.from_pretrained(pretrained)
    except load_errors() as err:
        raise AdapterError(f"cannot read the config of model {shorten(pretrained)} ({str(err).splitlines()[0]}): give a "
                           "local directory saved with save_pretrained, or a hub id that is cached or reachable") from None
    architectures = list(getattr(config, "architectures", None) or [])
    if not set(architectures) & set(SHIMS):
        raise AdapterError(f"model {shorten(pretrained)} ({', '.join(architectures) or config.model_type}) is not supported; "
                           f"supported: {', '.join(sorted(SHIMS))}")


def plan(pretrained: str | None, adapters=None, semclip=None) -> Plan:
    """Check the arguments without loading weights. `pretrained` defaults to the adapters' base model."""
    from ..train import resolve_adapter_dir

    directory = None
    if adapters:
        if not Path(adapters).is_dir():
            raise AdapterError(f"adapter directory not found: {adapters}")
        directory = resolve_adapter_dir(adapters)
    settings = semclip_settings(semclip)
    if directory is not None and settings is not None:
        methods = [a["method"] for a in read_config(directory)["adapters"]]
        if "semclip" not in methods:
            raise AdapterError(f"{directory} holds {methods}, no SemClip: SemClip settings can only tune a saved "
                               "SemClip; give them without --adapters, or save SemClip with the adapters")
        other = sorted(set(settings) - set(INFERENCE_KNOBS))
        if other:
            raise AdapterError(f"SemClip settings {other} are fixed by the saved scorer in {directory}; "
                               f"only {', '.join(INFERENCE_KNOBS)} can change")
    if not pretrained:
        if directory is None:
            raise AdapterError("give the base model (pretrained=HUB_ID_OR_DIR, --model) or an adapter directory")
        pretrained = stored_base(read_config(directory), directory)
        if not pretrained:
            raise AdapterError(f"{directory} does not record its base model's name: give pretrained= (--model)")
    check_model(pretrained)
    return Plan(str(pretrained), directory, settings)


def load(plan: Plan, dtype: str = "float32", options=None):
    """(model, processor): the base, the base wrapped with the plan's adapters, or with SemClip.
    `options`: how to load a big base (vlm_adapters.bases.LoadOptions)."""
    from ..train import load_base, load_trained
    from ..wrap import wrap

    base, processor = load_base(plan.pretrained, dtype, options=options)
    if plan.adapters is not None:
        model = load_trained(base, plan.adapters, processor)
        if plan.semclip:
            _tune_semclip(model, plan.semclip)
    elif plan.semclip is not None:
        model = wrap(base, SemClipConfig(**plan.semclip), processor=processor)
    else:
        model = base
    return model.eval(), processor


def _tune_semclip(model, settings: dict) -> None:
    module = model.adapters["semclip"]
    config = dataclasses.replace(module.config, **settings)  # validated again
    module.config = config
    model.configs = [config if c.method == "semclip" else c for c in model.configs]
