"""Token accounting: the visual tokens SemClip used beside what feeding every crop would cost.

SemClip feeds the overview image plus its k chosen crops. The AnyRes-style alternative (LLaVA-NeXT,
tiling) feeds the overview plus every tile of a grid, 2x2 by default. Both are counted the way the
VLM itself counts them: the overview and chosen crops from what the last call added
(`Choice.overview_tokens`, `Choice.crop_tokens`), the grid tiles from the placeholders the VLM's own
processor puts in a prompt for each tile (exact for dynamic-resolution families such as Qwen2-VL).

    wrapped(**inputs, images=[image])
    for account in token_accounts(wrapped, [image]):
        print(account)  # visual tokens: 576 overview + 576 (1 crop) = 1152; all 4 crops of a 2x2 ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import AdapterError
from .boxes import propose_boxes
from ..inputs import chat_prompt
from ..processing import process
from .scorer import to_rgb


@dataclass
class TokenAccount:
    overview: int  # visual tokens of the overview image
    crops: int  # visual tokens SemClip added (its k chosen crops)
    k: int
    grid: tuple[int, int]  # (rows, cols) of the all-crops alternative
    grid_crops: int  # visual tokens of every tile of that grid

    @property
    def used(self) -> int:
        return self.overview + self.crops

    @property
    def all_crops(self) -> int:
        return self.overview + self.grid_crops

    @property
    def fraction(self) -> float:
        """SemClip's visual tokens as a fraction of the all-crops cost."""
        return self.used / self.all_crops

    def __str__(self) -> str:
        rows, cols = self.grid
        return (f"visual tokens: {self.overview} overview + {self.crops} ({self.k} crop{'s' * (self.k != 1)}) "
                f"= {self.used}; all {rows * cols} crops of a {rows}x{cols} grid + overview (AnyRes-style) = "
                f"{self.all_crops}; SemClip uses {self.fraction:.0%}")


def tokens_per_image(processor, shim, images: list) -> list[int]:
    """The visual tokens the VLM's processor gives each image (one single-image prompt each)."""
    prompt = chat_prompt(processor, "?")
    inputs = process(processor, [prompt] * len(images), [to_rgb(i) for i in images])
    return shim.image_run_lengths(inputs["input_ids"]).tolist()


def token_accounts(wrapped, images: list, *, grid: tuple[int, int] = (2, 2)) -> list[TokenAccount]:
    """One TokenAccount per image of the wrapped model's last call (`images`: the same originals, in
    prompt order). After a call with top_k=0 no crop was added: overview from the processor, k=0."""
    if "semclip" not in wrapped.adapters:
        raise AdapterError("token accounting is for a model wrapped with SemClipConfig")
    choices = wrapped.adapters["semclip"].last_choices
    if choices and len(choices) != len(images):
        raise AdapterError(f"the last call had {len(choices)} image(s); pass those {len(choices)} images, "
                           f"got {len(images)}")
    rows, cols = grid
    accounts = []
    for n, image in enumerate(images):
        image = to_rgb(image)
        tiles = [image.crop(b) for b in propose_boxes(*image.size, scales=[(rows, cols)])]
        with torch.no_grad():
            counts = tokens_per_image(wrapped.processor, wrapped.shim, [image] + tiles)
        choice = choices[n] if choices else None
        overview = choice.overview_tokens if choice and choice.overview_tokens else counts[0]
        crops, k = (choice.crop_tokens, len(choice.chosen)) if choice else (0, 0)
        accounts.append(TokenAccount(overview, crops, k, (rows, cols), sum(counts[1:])))
    return accounts
