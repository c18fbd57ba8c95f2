"""Adapter modules: plain nn.Modules, one per method, each registering itself on import."""

from .tgfom import TGFOM, TGFOMConfig

__all__ = ["TGFOM", "TGFOMConfig"]
