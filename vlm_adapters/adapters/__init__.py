"""Adapter modules: plain nn.Modules, one per method, each registering itself on import."""

from .semclip import SemClip, SemClipConfig
from .tgdp import TGDP, TGDPConfig
from .tgfom import TGFOM, TGFOMConfig
from .tie import TIE, TIEConfig

__all__ = ["SemClip", "SemClipConfig", "TGDP", "TGDPConfig", "TGFOM", "TGFOMConfig", "TIE", "TIEConfig"]
