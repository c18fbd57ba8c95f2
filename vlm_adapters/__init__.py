"""vlm_adapters: text-guided adapters for off-the-shelf transformers vision-language models.

The public names are imported on first use (PEP 562), so that `import vlm_adapters` and the CLI's
`--help` do not load torch, transformers or open_clip.
"""

import importlib
import sys
import types

from .errors import AdapterError  # plain Python, no heavy imports
from .version import __version__

_LAZY = {  # public name -> the module that defines it
    "SemClipConfig": ".adapters", "TGDPConfig": ".adapters", "TGFOMConfig": ".adapters", "TIEConfig": ".adapters",
    "METHODS": ".config", "AdapterConfig": ".config", "TextConfig": ".config", "config_from_dict": ".config",
    "register_method": ".config", "load_adapters": ".wrap", "AdaptedModel": ".wrap", "wrap": ".wrap",
    "AdapterTrainer": ".train.hf", "AdapterSFTTrainer": ".train.hf", "LlavaCollator": ".train.hf",
}

__all__ = ["AdapterError", "__version__", *sorted(_LAZY)]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'vlm_adapters' has no attribute {name!r}")
    importlib.import_module(".adapters", __name__)  # the built-in methods register themselves on import
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """`vlm_adapters.wrap` is the function, as it always was: importing the submodule of the same
    name (which the import system records as an attribute of the package) keeps the function."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == f".{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
