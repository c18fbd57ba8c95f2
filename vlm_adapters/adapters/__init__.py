"""Adapter modules: plain nn.Modules, one per method, each registering itself on import."""

from .tgdp import TGDP, TGDPConfig
from .tgfom import TGFOM, TGFOMConfig

__all__ = ["TGDP", "TGDPConfig", "TGFOM", "TGFOMConfig"]
