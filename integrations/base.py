"""What every family shim provides; a family's shim states only how it differs (modular style).

The default implementation fits the LLaVA layout: a vision tower, a `multi_modal_projector` that
takes (rows, tokens, dim) features, one image placeholder token expanded by the processor.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vlm_adapters.errors import AdapterError

# fn(image_index, grid) -> mask for those images' tokens, (len(image_index), tokens, vision_dim)
MaskFn = Callable[[torch.Tensor, "tuple[int, int] | None"], torch.Tensor]


@dataclass(frozen=True)
class TokenLayout:
    """Tokens one image (or one crop/tile) gives before the projector: `num_prefix` extra tokens
    (e.g. CLS) then a `grid` of patches; dynamic-resolution families give their default grid."""

    grid: tuple[int, int]
    num_prefix: int = 0


class Handle:
    """Undo for a patch or hook, like torch's RemovableHandle."""

    def __init__(self, undo: Callable[[], None]):
        self._undo = undo

    def remove(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None


IMAGE_FEATURES = "image_features"  # the Guidance memo key of Shim.image_features


class Shim:
    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    pixel_key: ClassVar[str] = "pixel_values"
    turn_end_markers: ClassVar[tuple[str, ...]] = ("ASSISTANT:", "[/INST]", "\n###")
    # where the next user turn starts, in templates whose turns are plain text (turn_end_markers)
    turn_start_markers: ClassVar[tuple[str, ...]] = ("USER:", "[INST]", "### Human")
    sparse_tiles: ClassVar[bool] = True  # detail_features can encode chosen tiles; overview_tokens works

    def __init__(self, model: nn.Module):
        self.model = model
        self.context: Callable = lambda: None  # set by the wrapper: the current Guidance
        self._in_images = False
        self._stage_handle: Handle | None = None

    # -- structure -------------------------------------------------------------------------------
    @property
    def inner(self) -> nn.Module:
        return self.model.model

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    @property
    def image_end_token_id(self) -> int | None:
        """A token that closes an image's placeholders (Qwen's <|vision_end|>), if any."""
        return None

    def projector(self) -> nn.Module:
        return self.inner.multi_modal_projector

    def vision_dim(self) -> int:
        return self.projector().linear_1.in_features

    def token_layout(self) -> TokenLayout:
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        full = getattr(self.model.config, "vision_feature_select_strategy", "default") == "full"
        return TokenLayout((side, side), num_prefix=int(full))

    def fingerprint(self) -> dict:
        """Shapes the adapters are built for; a saved adapter loads only onto a matching base."""
        layout = self.token_layout()
        return {
            "family": self.family,
            "vision_dim": self.vision_dim(),
            "token_grid": list(layout.grid),
            "token_prefix": layout.num_prefix,
            "text_hidden_size": self.model.get_input_embeddings().embedding_dim,
            "vocab_size": self.model.get_input_embeddings().num_embeddings,
        }

    # -- inputs ----------------------------------------------------------------------------------
    def check_pixels(self, inputs: dict) -> None:
        vc = self.model.config.vision_config
        size = vc.image_size
        px = inputs[self.pixel_key]
        if px.dim() != 4 or px.shape[1] != vc.num_channels or tuple(px.shape[-2:]) != (size, size):
            raise AdapterError(
                f"{self.pixel_key} has shape {tuple(px.shape)}; {self.family} expects "
                f"(num_images, {vc.num_channels}, {size}, {size}): use the model's processor"
            )

    def num_images(self, inputs: dict) -> int:
        return inputs[self.pixel_key].shape[0]

    def row_images(self, inputs: dict, rows: int) -> torch.Tensor:
        """Image index of each row of the projector's input."""
        return torch.arange(rows)

    def image_sample(self, inputs: dict, batch: int) -> torch.Tensor:
        """Sample index of each image, from the placeholder runs in `input_ids`."""
        n = self.num_images(inputs)
        ids = inputs.get("input_ids")
        if ids is None:
            if n != batch:
                raise AdapterError(
                    f"{n} images for {batch} samples given as inputs_embeds: pass input_ids so each "
                    "image can be matched to its sample's question"
                )
            return torch.arange(batch)
        is_img = ids == self.image_token_id
        starts = is_img & ~F.pad(is_img, (1, 0))[:, :-1]
        counts = starts.sum(1)
        if int(counts.sum()) != n:
            raise AdapterError(
                f"the prompt has {int(counts.sum())} image placeholder runs but {n} images were "
                "given; build inputs with the model's processor (and keep images' placeholders apart)"
            )
        return torch.repeat_interleave(torch.arange(batch), counts.cpu())

    def questions(self, input_ids: torch.Tensor, attention_mask, tokenizer, missing_ok: bool = False) -> list:
        """The user turn's text after each sample's last image, up to the end of the turn
        (None for a sample without question text when `missing_ok`, an error otherwise)."""
        special = set(tokenizer.all_special_ids) | {self.image_token_id}
        out = []
        for b, row in enumerate(input_ids):
            if attention_mask is not None:
                row = row[attention_mask[b].bool()]
            row = row.tolist()
            last = max((i for i, t in enumerate(row) if t == self.image_token_id), default=None)
            if last is None:
                raise AdapterError(f"sample {b} has no image placeholder: cannot find its question")
            tail = row[last + 1 :]
            start = 1 if tail[:1] == [self.image_end_token_id] else 0
            if self.turn_end_markers:  # plain-text turns: special tokens may be the user's own text
                text = self._user_turn(tokenizer.decode(tail[start:]))
            else:
                end = next((i for i, t in enumerate(tail[start:], start) if t in special), len(tail))
                text = tokenizer.decode(tail[start:end])
            if not text.strip() and missing_ok:
                out.append(None)
                continue
            if not text.strip():
                raise AdapterError(
                    f"sample {b}: no question text after its image in the prompt; "
                    "pass guidance_text=[...] with one question per sample"
                )
            out.append(text.strip())
        return out

    def _user_turn(self, text: str) -> str:
        """The user turn's text in a plain-text template (`Q ASSISTANT: A USER: Q2 ASSISTANT:`): up to
        the last turn end before the next user turn, so a question that itself holds `ASSISTANT:` or
        `</s>` is kept whole."""
        starts = [i for m in self.turn_start_markers if (i := text.find(m)) >= 0]
        limit = min(starts, default=len(text))
        ends = [i for m in self.turn_end_markers if (i := text.rfind(m, 0, limit)) >= 0]
        if not ends:  # no turn end before the next user turn: the first one anywhere
            ends = [i for m in self.turn_end_markers if (i := text.find(m)) >= 0][:1]
        return text[: max(ends)] if ends else text

    # -- extra tokens and high-resolution detail ---------------------------------------------------
    def image_run_ends(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(n_images, 2): (sample, position just after the image's placeholder run), prompt order."""
        is_img = input_ids == self.image_token_id
        last = is_img & ~F.pad(is_img, (0, 1))[:, 1:]
        ends = last.nonzero()
        return torch.stack([ends[:, 0], ends[:, 1] + 1], dim=1)

    def image_run_lengths(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(n_images,): the number of placeholder tokens of each image, in prompt order."""
        is_img = (input_ids == self.image_token_id).flatten()
        starts = (is_img & ~F.pad(is_img, (1, 0))[:-1]).nonzero().flatten()
        ends = (is_img & ~F.pad(is_img, (0, 1))[1:]).nonzero().flatten()
        return ends - starts + 1

    def llm_dim(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    def encode_images(self, pixel_inputs: dict) -> list[torch.Tensor]:
        """LLM-space tokens of each image in `pixel_inputs` (the processor's image outputs), through
        the model's own vision tower and projector, in one call, without the adapters' image hooks."""
        out = type(self.inner).get_image_features(self.inner, **pixel_inputs)
        return list(out.pooler_output)

    @property
    def pad_token_id(self) -> int:
        pad = self.model.config.get_text_config().pad_token_id
        return 0 if pad is None else int(pad)

    def base_images(self, inputs: dict) -> torch.Tensor:
        """(n_images, C, S, S): each image at the vision tower's input size, as the processor made it."""
        return inputs[self.pixel_key]

    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(P, tokens, vision_dim) pre-projector features of P images, in one vision-tower call,
        selected as the model selects them (feature layer(s), CLS dropped or kept)."""
        cfg = self.model.config
        out = self.inner.vision_tower(pixels, output_hidden_states=True, return_dict=True)
        layers = cfg.vision_feature_layer
        layers = [layers] if isinstance(layers, int) else layers
        feats = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        return feats[:, 1:] if cfg.vision_feature_select_strategy == "default" else feats

    def detail_dim(self) -> int:
        return self.vision_dim()

    def detail_features(self, inputs: dict, scale: float, chosen: torch.Tensor | None = None):
        """High-resolution features of every image: upscale by `scale`, pad to whole tiles of the
        encoder's input size, encode all tiles of the batch (or each image's `chosen` (n, k) tiles,
        row-major) in one call. Returns feats (n, T, D), mask (n, T) and each token's tile (n, T)."""
        images = self.base_images(inputs)
        size, side = images.shape[-1], math.ceil(scale)
        up = F.interpolate(images, size=round(size * scale), mode="bilinear", align_corners=False)
        up = F.pad(up, (0, side * size - up.shape[-1], 0, side * size - up.shape[-2]))
        tiles = rearrange(up, "n c (sh h) (sw w) -> n (sh sw) c h w", sh=side, sw=side)
        if chosen is None:
            chosen = torch.arange(side * side, device=tiles.device).expand(tiles.shape[0], -1)
        tiles = tiles[torch.arange(tiles.shape[0], device=tiles.device)[:, None], chosen.to(tiles.device)]
        k = chosen.shape[1]
        feats = rearrange(self.vision_features(tiles.flatten(0, 1)), "(n q) t d -> n (q t) d", q=k)
        tile = chosen.to(feats.device).repeat_interleave(feats.shape[1] // k, dim=1)
        mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        return feats, mask, tile

    def image_features(self, inputs: dict):
        """get_image_features' output for this call's images, exactly as the base's forward gets it
        (the adapters' image hooks included), computed once per call: the base's own call returns it."""
        ctx = self._require_context()
        self._image_stage()
        pixels = inputs[self.pixel_key]
        extra = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
        return ctx.memo(IMAGE_FEATURES, lambda: (pixels, self.inner.get_image_features(
            pixel_values=pixels, return_dict=True, **extra)))[1]

    def overview_tokens(self, inputs: dict) -> torch.Tensor:
        """(n_images, h, w, llm_dim): each image's LLM-space tokens on its grid (image_features)."""
        feats = self.image_features(inputs).pooler_output
        layout = self.token_layout()
        feats = torch.stack(list(feats))[:, layout.num_prefix:]
        return rearrange(feats, "n (h w) d -> n h w d", h=layout.grid[0], w=layout.grid[1])

    # -- vision blocks (TIE) ---------------------------------------------------------------------
    def vision_blocks(self) -> list[nn.Module]:
        """The vision tower's transformer blocks whose output reaches the image features, in order
        (LLaVA reads hidden_states[vision_feature_layer]: the blocks after it are left out)."""
        tower = self.inner.vision_tower  # CLIPVisionModel (older transformers nest it in .vision_model)
        layers = getattr(tower, "vision_model", tower).encoder.layers
        chosen = self.model.config.vision_feature_layer
        chosen = [chosen] if isinstance(chosen, int) else chosen
        return list(layers[: max(k % (len(layers) + 1) for k in chosen)])

    def vision_block_dim(self) -> int:
        return self.model.config.vision_config.hidden_size

    def block_layout(self) -> TokenLayout:
        """Tokens of one row of a block's hidden states: CLS, then the patch grid."""
        vc = self.model.config.vision_config
        return TokenLayout((vc.image_size // vc.patch_size,) * 2, num_prefix=1)

    def block_images(self, inputs: dict, hidden: torch.Tensor) -> torch.Tensor:
        """Image index of each row of a block's (rows, tokens, dim) hidden states
        (of each token, for families whose blocks see one packed (tokens, dim) sequence)."""
        return self.row_images(inputs, hidden.shape[0])

    def block_map(self, inputs: dict, values: torch.Tensor, image: int) -> torch.Tensor:
        """(h, w, ...) map of per-token `values` (shaped like a block's hidden states, any trailing
        dims instead of the width) on `image`'s first row: the whole image (base crop, thumbnail)."""
        layout = self.block_layout()
        row = int(torch.nonzero(self.row_images(inputs, values.shape[0]) == image)[0])
        return values[row, layout.num_prefix :].reshape(*layout.grid, *values.shape[2:])

    def hook_vision_blocks(self, fn: Callable, blocks: list[int]) -> Handle:
        """After each chosen block, while image features are computed, replace its hidden states
        with fn(block, hidden, images); `images` is block_images() for `hidden`."""
        self._image_stage()
        modules = self.vision_blocks()

        def hook_for(block: int):
            def hook(module, args, output):
                if not self._in_images:
                    return None
                ctx = self._require_context()
                hidden = output[0] if isinstance(output, tuple) else output
                images = ctx.memo(("block_images", tuple(hidden.shape)),
                                  lambda: self.block_images(ctx.inputs, hidden).to(hidden.device))
                new = fn(block, hidden, images)
                return (new, *output[1:]) if isinstance(output, tuple) else new

            return hook

        # prepend: transformers' output-capturing hooks (LLaVA's hidden_states) must see the new output
        handles = [modules[b].register_forward_hook(hook_for(b), prepend=True) for b in blocks]
        return Handle(lambda: [h.remove() for h in handles])

    # -- hooks -----------------------------------------------------------------------------------
    def _image_stage(self) -> None:
        """Mark calls of get_image_features, so that feature hooks skip video features."""
        if self._stage_handle is not None:
            return
        inner, original = self.inner, self.inner.get_image_features

        @functools.wraps(original)  # generate() reads its signature to pick the kwargs
        def get_image_features(*args, **kwargs):
            ctx = self.context()
            kept = None if ctx is None else ctx.kept(IMAGE_FEATURES)  # computed already (image_features)
            if kept is not None and not args and kwargs.get("pixel_values") is kept[0]:
                return kept[1]
            self._in_images = True
            try:
                return original(*args, **kwargs)
            finally:
                self._in_images = False

        inner.get_image_features = get_image_features
        self._stage_handle = Handle(lambda: delattr(inner, "get_image_features"))

    def add_to_vision_features(self, fn: MaskFn) -> Handle:
        """Add fn's mask to the image features entering the projector: F* = F + mask."""
        self._image_stage()

        def pre_hook(module, args):
            if not self._in_images:
                return None
            ctx = self._require_context()
            feats = args[0]
            rows = self.row_images(ctx.inputs, feats.shape[0]).to(feats.device)
            return (feats + fn(rows, None).to(feats.device, feats.dtype), *args[1:])

        h = self.projector().register_forward_pre_hook(pre_hook)
        return Handle(h.remove)

    def _require_context(self):
        ctx = self.context()
        if ctx is None:
            raise AdapterError("adapters ran without guidance: call the wrapped model, not its base")
        return ctx

    def remove(self) -> None:
        if self._stage_handle is not None:
            self._stage_handle.remove()
            self._stage_handle = None
