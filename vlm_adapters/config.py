"""Method configs and the one registry that maps a method name to its config and module."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import AdapterError, shorten

TEXT_BACKENDS = ("vlm", "open_clip", "hf_clip", "hf")
POOLINGS = ("mean", "cls")  # the "hf" backend's pooled feature


@dataclass
class TextConfig:
    """Where the question's features come from.

    backend: "vlm" (the VLM's own token embeddings, no extra model), "open_clip" (an open_clip text
    tower: `name` is the architecture, `weights` an optional local .safetensors file, random init
    from `seed` otherwise), "hf_clip" (a transformers CLIP text model: `name` is a hub id or path) or
    "hf" (any transformers encoder, e.g. BERT or a sentence-transformers model: `name` is a hub id or
    path; `pooling` "mean" over the attention mask, the sentence-transformers recipe, or "cls").
    """

    backend: str = "vlm"
    name: str | None = None
    weights: str | None = None
    max_length: int = 77
    seed: int = 0
    pooling: str | None = None  # "hf" only: "mean" (the default) or "cls"

    @property
    def key(self) -> str:
        """One name per distinct text encoder (a module name: no dots), shared by the adapters that use it."""
        pooling = f":{self.pooling}" if self.pooling else ""
        return f"{self.backend}:{self.name}:{self.weights}:{self.seed}:{self.max_length}{pooling}".replace(".", "_")

    def validate(self) -> None:
        if self.backend not in TEXT_BACKENDS:
            raise AdapterError(f"text.backend={shorten(self.backend)}; choose one of {TEXT_BACKENDS}")
        if self.backend != "vlm" and not self.name:
            example = {"open_clip": "ViT-B-32", "hf_clip": "openai/clip-vit-large-patch14",
                       "hf": "sentence-transformers/all-MiniLM-L6-v2"}[self.backend]
            raise AdapterError(f"text.backend={shorten(self.backend)} needs text.name (e.g. {shorten(example)})")
        if self.weights and not str(self.weights).endswith(".safetensors"):
            raise AdapterError(
                f"text.weights={shorten(self.weights)}: only .safetensors files are loaded (never pickles); "
                "convert it with safetensors.torch.save_file"
            )
        if self.max_length < 1:
            raise AdapterError(f"text.max_length must be >= 1, got {self.max_length}")
        if self.pooling is not None and self.backend != "hf":
            raise AdapterError(f"text.pooling={self.pooling!r} is for the 'hf' backend; the {self.backend!r} "
                               "backend has its own pooled feature: leave text.pooling unset")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise AdapterError(f"text.pooling={self.pooling!r}: choose one of {POOLINGS} (mean: over the attention "
                               "mask, as sentence-transformers does; cls: the first token's feature)")


@dataclass
class AdapterConfig:
    """Base of every method's config: JSON-serialisable, validated, named by `method`."""

    method: ClassVar[str] = ""
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        if isinstance(self.text, dict):
            self.text = _from_fields(TextConfig, self.text, "text")
        self.validate()

    def validate(self) -> None:
        self.text.validate()

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type[AdapterConfig]
    module_cls: type


METHODS: dict[str, Method] = {}


def register_method(name: str, config_cls: type[AdapterConfig], module_cls: type) -> None:
    """Register a method in one line, beside its module (the peft pattern); a taken name is refused."""
    if name in METHODS:
        raise AdapterError(f"an adapter method named {shorten(name)} is registered already "
                           f"({METHODS[name].config_cls.__name__}); choose another name")
    config_cls.method = name
    METHODS[name] = Method(name, config_cls, module_cls)


def registered_methods() -> dict[str, Method]:
    """Every registered method; the built-in ones are imported (and register themselves) on first use."""
    from . import adapters  # noqa: F401  (imports torch: kept out of `import vlm_adapters` and the CLI's start)

    return METHODS


BUILTIN_METHODS = ("semclip", "tgdp", "tgfom", "tie")  # vlm_adapters.adapters registers these (a test checks it)


def method_names() -> list[str]:
    """The built-in method names and any registered so far, without importing the adapters (torch):
    for listing recipes."""
    return sorted(set(BUILTIN_METHODS) | set(METHODS))


def get_method(name: str) -> Method:
    if name not in registered_methods():
        raise AdapterError(f"unknown adapter method {shorten(name)}; known: {sorted(METHODS)}")
    return METHODS[name]


def config_from_dict(data: dict[str, Any]) -> AdapterConfig:
    """Rebuild a config from `to_dict()` output; unknown keys are errors with a suggestion."""
    data = dict(data)
    method = get_method(data.pop("method", ""))
    return _from_fields(method.config_cls, data, method.name)


def _from_fields(cls: type, data: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1)
            did = f"; did you mean {shorten(hint[0])}?" if hint else f"; valid keys: {sorted(names)}"
            raise AdapterError(f"unknown key {shorten(key)} in {where} config{did}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if not _is_a(value, hints[key]):
            default = _default(cls, key)
            shown = "" if dataclasses.is_dataclass(default) else f" (default {shorten(default)})"
            raise AdapterError(f"{where} config: {key}={shorten(value)} is not {_type_name(hints[key])}; fix {key}{shown}")
    return cls(**data)


def _is_a(value, tp) -> bool:
    """Whether a JSON value fits a config field's annotation (ints count as floats, bools as neither)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is Any:
        return True
    if dataclasses.is_dataclass(tp):
        return isinstance(value, (dict, tp))
    if tp is list or origin is list:
        return isinstance(value, (list, tuple)) and (not args or all(_is_a(v, args[0]) for v in value))
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _type_name(tp) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list"}.get(
        typing.get_origin(tp) or tp, str(tp))


def _default(cls, key: str):
    f = {f.name: f for f in dataclasses.fields(cls)}[key]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None
