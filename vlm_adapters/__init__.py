"""vlm_adapters: text-guided adapters for off-the-shelf transformers vision-language models."""

__version__ = "0.1.0"

from .adapters import SemClipConfig, TGDPConfig, TGFOMConfig, TIEConfig  # noqa: E402  (registers the methods)
from .config import METHODS, AdapterConfig, TextConfig, config_from_dict, register_method  # noqa: E402
from .errors import AdapterError  # noqa: E402
from .io import load_adapters  # noqa: E402
from .wrap import AdaptedModel, wrap  # noqa: E402

__all__ = [
    "METHODS", "AdaptedModel", "AdapterConfig", "AdapterError", "SemClipConfig", "TGDPConfig", "TGFOMConfig",
    "TIEConfig", "TextConfig",
    "__version__", "config_from_dict", "load_adapters", "register_method", "wrap",
]
