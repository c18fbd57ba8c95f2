"""psi, the relevance scorer: a frozen open_clip dual encoder with small trainable heads.

Score(crop, question) = cosine(image_head(CLIP image embedding), text_head(CLIP text embedding)).
The heads start as the identity, so an untrained scorer is CLIP's own zero-shot relevance. All crops
of a batch are cut and resized with one `roi_align` per image and embedded in one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.ops import roi_align
from torchvision.transforms.functional import pil_to_tensor

from ..errors import AdapterError, shorten
from ..hub import require_open_clip
from ..inputs import to_rgb  # noqa: F401  (the one RGB conversion; imported from here by callers)
from ..text import load_safetensors_into


class RelevanceScorer(nn.Module):
    def __init__(self, *, arch: str, weights: str | None = None, seed: int = 0, head_dim: int | None = None):
        super().__init__()
        import open_clip

        if arch not in open_clip.list_models():
            raise AdapterError(f"unknown open_clip architecture {shorten(arch)}; see open_clip.list_models()")
        require_open_clip(arch, "SemClip's scorer (scorer_arch)")  # an HF tokenizer or text config it fetches
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random init must be reproducible: the frozen CLIP is not saved
            clip = open_clip.create_model(arch, pretrained=None)
        if weights:
            load_safetensors_into(clip, weights)
        self.frozen = clip.eval().requires_grad_(False)  # "frozen" submodules are never saved
        self.tokenizer = open_clip.get_tokenizer(arch)
        cfg = clip.visual.preprocess_cfg
        self.size = tuple(cfg["size"]) if not isinstance(cfg["size"], int) else (cfg["size"],) * 2
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(3, 1, 1), persistent=False)
        with torch.no_grad():
            embed = clip.encode_text(self.tokenizer(["a"])).shape[-1]
        head_dim = head_dim or embed
        self.image_head, self.text_head = nn.Linear(embed, head_dim), nn.Linear(embed, head_dim)
        for head in (self.image_head, self.text_head):
            nn.init.eye_(head.weight)
            nn.init.zeros_(head.bias)

    def crops(self, image: Image.Image, boxes) -> torch.Tensor:
        """(len(boxes), 3, *size) normalised crops of one image, cut and resized in one call."""
        pixels = pil_to_tensor(to_rgb(image)).to(self.mean.device, torch.float32).div_(255)
        rois = torch.tensor(boxes, dtype=torch.float32, device=pixels.device)
        out = roi_align(pixels[None], [rois], output_size=self.size, sampling_ratio=-1, aligned=True)
        return (out - self.mean) / self.std

    def embed_images(self, crops: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = self.frozen.encode_image(crops.to(self.mean.device, self.mean.dtype))  # the tower's dtype
        return F.normalize(self.image_head(feats.to(self.image_head.weight.dtype)), dim=-1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            feats = self.frozen.encode_text(self.tokenizer(texts).to(self.mean.device))
        return F.normalize(self.text_head(feats.to(self.text_head.weight.dtype)), dim=-1)

    def forward(self, crops: torch.Tensor, owner: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Cosine score of each crop against its owner's question: (C,)."""
        return (self.embed_images(crops) * self.embed_texts(texts)[owner]).sum(-1)
