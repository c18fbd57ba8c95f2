"""Options for loading a big base with transformers: device_map, 4/8-bit quantization, attention.

The same options come from a recipe (`model.*`), the CLI (`--device-map` ...) and lmms-eval's
`--model_args`; each is checked here (one-line errors) and handed to `from_pretrained` unchanged.
`device_map` ("auto", "balanced", "sequential", a device such as "cpu" or "cuda:1", or a map of
module name -> device, "cpu" or "disk") lets accelerate split the base over GPUs, CPU and disk
(`offload_folder` for disk); `quantization` ("4bit", "8bit", or BitsAndBytesConfig fields) loads
it with bitsandbytes, which needs a CUDA GPU; `attn_implementation` picks the attention kernel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import AdapterError, shorten

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
QUANTIZATION = {"4bit": {"load_in_4bit": True}, "8bit": {"load_in_8bit": True}}


@dataclass
class LoadOptions:
    device_map: Any = None
    quantization: Any = None
    attn_implementation: str | None = None
    offload_folder: str | None = None

    def __post_init__(self) -> None:
        self.device_map = device_map(self.device_map)
        self.quantization = quantization(self.quantization)
        if self.attn_implementation is not None and self.attn_implementation not in ATTENTION:
            raise AdapterError(f"attn_implementation={shorten(self.attn_implementation)}; "
                               f"choose one of {', '.join(ATTENTION)}")

    @property
    def placed(self) -> bool:
        """True when transformers places the weights itself (a device_map or a quantized load)."""
        return self.device_map is not None or self.quantization is not None

    def from_pretrained_kwargs(self) -> dict:
        """The keyword arguments for `from_pretrained` (only those that are set)."""
        kwargs = {"device_map": self.device_map, "attn_implementation": self.attn_implementation,
                  "offload_folder": self.offload_folder}
        if self.quantization is not None:
            kwargs["quantization_config"] = bitsandbytes_config(self.quantization)
        return {k: v for k, v in kwargs.items() if v is not None}


def _json_or(value, what: str, example: str):
    """A JSON object given as a string (from the CLI or model_args) becomes a dict."""
    if isinstance(value, str) and value.strip().startswith("{"):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, RecursionError) as err:
            raise AdapterError(f"{what}={shorten(value)} is not valid JSON ({err}); e.g. {example}") from None
    return value


def device_map(value):
    """None, a strategy, one device (cpu, cuda, cuda:1, mps, an int GPU index), or a map module -> device."""
    value = _json_or(value, "device_map", '\'{"model.vision_tower": 0, "model.language_model": "cpu"}\'')
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        bad = {k: v for k, v in value.items() if not isinstance(k, str) or not _is_device(v, disk=True)}
        if not value or bad:
            raise AdapterError(f"device_map: each module name maps to a device (0, 'cuda:1', 'cpu' or 'disk'); "
                               f"bad entries: {bad or 'none given'}")
        return value
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if value in DEVICE_MAP_STRATEGIES or _is_device(value, disk=False):
        return value
    raise AdapterError(f"device_map={shorten(value)}: give {', '.join(DEVICE_MAP_STRATEGIES)}, a device (cpu, cuda:0, 0) "
                       "or a JSON map of module name -> device")


def _is_device(value, disk: bool) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return value >= 0
    if not isinstance(value, str):
        return False
    if disk and value == "disk":
        return True
    kind, _, index = value.partition(":")
    return kind in ("cpu", "cuda", "mps", "xpu", "npu", "meta") and (not index or index.isdigit())


def quantization(value):
    """None, "4bit", "8bit", or a dict of BitsAndBytesConfig fields."""
    value = _json_or(value, "quantization", '\'{"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}\'')
    if value is None or value == "" or value is False:
        return None
    if isinstance(value, str) and value in QUANTIZATION:
        return dict(QUANTIZATION[value])
    if isinstance(value, dict) and (value.get("load_in_4bit") or value.get("load_in_8bit")):
        return dict(value)
    raise AdapterError(f"quantization={shorten(value)}: give 4bit, 8bit, or BitsAndBytesConfig fields with "
                       "load_in_4bit or load_in_8bit true")


def bitsandbytes_config(fields: dict):
    """A BitsAndBytesConfig; bitsandbytes runs only on a CUDA GPU, which is checked first."""
    import torch
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise AdapterError("4-bit and 8-bit loading (bitsandbytes) needs a CUDA GPU; on this machine load the base "
                           "unquantized (drop quantization), with device_map to spread it over devices or disk")
    fields = dict(fields)
    for key in ("bnb_4bit_compute_dtype",):
        if isinstance(fields.get(key), str):
            fields[key] = getattr(torch, fields[key])
    try:
        return BitsAndBytesConfig(**fields)
    except (TypeError, ValueError) as err:
        raise AdapterError(f"quantization: {err}") from None


def check_device(device: str, options: LoadOptions) -> None:
    """--device names one device; with a device_map (or a quantized load) transformers places the base."""
    from .devices import check_available

    if options.placed and device not in ("auto", None):
        raise AdapterError(f"device={shorten(device)} with device_map/quantization: give one of them (device_map places "
                           "the base; device moves a base loaded whole)")
    check_available(device)  # before any model loads


def move(model, device: str, options: LoadOptions | None = None):
    """Put a base (or a wrapper) on `device` unless transformers placed it (device_map, quantization)."""
    from .train.model import resolve_device

    placed = getattr(model, "hf_device_map", None) is not None or getattr(model, "hf_quantizer", None) is not None
    if placed or (options is not None and options.placed):
        return model
    return model.to(resolve_device(device))
