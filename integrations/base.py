"""The machinery every family shares: prompt parsing, placeholder runs, hooks, tiling.

A family states its facts in a FamilySpec (spec.py) and implements the few methods marked
"family" below (pixel layout, token grids, pre-projector features); nothing here assumes a family.
Every hook marks its Handle when it acts, so the wrapper can refuse a forward that bypassed it.
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

from .spec import FamilySpec, resolve

# fn(image_index, grid) -> mask for those images' tokens, (len(image_index), tokens, vision_dim)
MaskFn = Callable[[torch.Tensor, "tuple[int, int] | None"], torch.Tensor]


@dataclass(frozen=True)
class TokenLayout:
    """Tokens one image (or one crop/tile) gives before the projector: `num_prefix` extra tokens
    (e.g. CLS) then a `grid` of patches; dynamic-resolution families give their default grid."""

    grid: tuple[int, int]
    num_prefix: int = 0


class Handle:
    """Undo for a patch or hook, like torch's RemovableHandle. A hook's handle names what it
    `watches`; the hook sets `ran` when it acts, so a forward that bypassed it is caught."""

    def __init__(self, undo: Callable[[], None] | None, watches: str | None = None):
        self._undo = undo
        self.watches = watches
        self.ran = False

    def remove(self) -> None:
        if self._undo is not None:
            self._undo()
            self._undo = None


IMAGE_FEATURES = "image_features"  # the Guidance memo key of Shim.image_features


def _family(name: str):
    def missing(self, *args, **kwargs):
        raise AdapterError(f"{type(self).__name__} does not define {name}(): a family shim must "
                           "(see integrations/square.py for the square-image one)")
    missing.__name__ = name
    return missing


def crops_centre(image_processor) -> bool:
    """Whether the processor shows the model only the centre square of an image (CLIP's)."""
    return bool(getattr(image_processor, "do_center_crop", False))


def tile_box(size: tuple[int, int], tile: int, scale: float, *, centre_crop: bool = False) -> tuple[int, ...]:
    """The box on a (w, h) image of TG-DP's tile `tile` (row-major, side = ceil(scale) to a row) at
    upscale `scale`: 1/scale of the processor's view of the image (its centre square where the
    processor centre-crops, else all of it); the last row and column may reach past the image."""
    (w, h), (r, c) = size, divmod(tile, math.ceil(scale))
    vw, vh = (min(w, h),) * 2 if centre_crop else (w, h)
    x0, y0 = (w - vw) / 2, (h - vh) / 2
    box = (x0 + c * vw / scale, y0 + r * vh / scale, x0 + (c + 1) * vw / scale, y0 + (r + 1) * vh / scale)
    return tuple(round(v) for v in box)


def at_least_one_pixel(box: tuple[int, ...]) -> tuple[int, ...]:
    """A box at least one pixel wide and high (the tiles of a tiny image round to empty boxes, which the
    processors' resize divides by)."""
    x0, y0, x1, y1 = box
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


class Shim:
    spec: ClassVar[FamilySpec]
    pixel_key: ClassVar[str] = "pixel_values"

    def __init__(self, model: nn.Module, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer  # the processor's: for families whose tokens are not all in the config
        self.context: Callable = lambda: None  # set by the wrapper: the current Guidance
        self._in_images = False
        self._stage_handle: Handle | None = None

    # -- facts from the spec ---------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def sparse_tiles(self) -> bool:
        return self.spec.sparse_tiles

    @property
    def turn_end_markers(self) -> tuple[str, ...]:
        return self.spec.turn_end

    @property
    def turn_start_markers(self) -> tuple[str, ...]:
        return self.spec.turn_start

    @property
    def inner(self) -> nn.Module:
        return resolve(self.model, self.spec.inner)

    @property
    def image_token_id(self) -> int:
        return int(resolve(self.model.config, self.spec.image_token))

    def vision_tower(self) -> nn.Module:
        return resolve(self.model, self.spec.vision_tower)

    def projector(self) -> nn.Module:
        return resolve(self.model, self.spec.projector)

    def vision_dim(self) -> int:
        return int(resolve(self.model, self.spec.vision_dim))

    def feature_layers(self) -> list[int] | None:
        """The hidden states the features come from (None: the tower's last output)."""
        if self.spec.feature_layer is None:
            return None
        chosen = resolve(self.model.config, self.spec.feature_layer)
        return [chosen] if isinstance(chosen, int) else list(chosen)

    def drops_prefix(self) -> bool:
        """Whether the features leave out the prefix tokens (LLaVA's "default" strategy)."""
        key = self.spec.feature_select
        return self.spec.prefix_tokens > 0 and (key is None or resolve(self.model.config, key) == "default")

    def vision_blocks(self) -> list[nn.Module]:
        """The tower's blocks whose output reaches the image features, in order (those after the
        feature layer are left out)."""
        blocks = list(resolve(self.model, self.spec.vision_blocks))
        layers = self.feature_layers()
        return blocks if layers is None else blocks[: max(k % (len(blocks) + 1) for k in layers)]

    # -- family: pixel layout and token grids ----------------------------------------------------
    check_pixels = _family("check_pixels")  # AdapterError unless inputs' pixels fit the family
    num_images = _family("num_images")  # images in the inputs
    row_images = _family("row_images")  # image index of each row of the projector's input
    token_layout = _family("token_layout")  # TokenLayout of one image's pre-projector features
    block_layout = _family("block_layout")  # TokenLayout of one row of a block's hidden states
    base_images = _family("base_images")  # (n, C, S, S): each image at the tower's input size
    vision_features = _family("vision_features")  # (P, tokens, vision_dim) of P base-size images
    vision_block_dim = _family("vision_block_dim")  # width of the blocks' hidden states

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
    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True at each image's placeholder tokens: one unbroken run per image."""
        return input_ids == self.image_token_id

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
        is_img = self.image_mask(ids)
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
            last = max(self.image_mask(torch.tensor(row)).nonzero().flatten().tolist(), default=None)
            if last is None:
                raise AdapterError(f"sample {b} has no image placeholder: cannot find its question")
            tail = row[last + 1 :]
            end_of_image = [tokenizer.convert_tokens_to_ids(self.spec.image_end)] if self.spec.image_end else None
            start = 1 if tail[:1] == end_of_image else 0
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
        is_img = self.image_mask(input_ids)
        last = is_img & ~F.pad(is_img, (0, 1))[:, 1:]
        ends = last.nonzero()
        return torch.stack([ends[:, 0], ends[:, 1] + 1], dim=1)

    def image_run_lengths(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(n_images,): the number of placeholder tokens of each image, in prompt order."""
        is_img = self.image_mask(input_ids).flatten()
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

    def detail_dim(self) -> int:
        return self.vision_dim()

    # True where the processor shrinks each image to the tower's input size, so TG-DP's tiles should be
    # cut from the originals (detail_features(originals=...)); False where it keeps the native resolution
    tiles_from_originals: ClassVar[bool] = True
    # True where the projector maps a batch of pre-projector features (P, T, D) to LLM-space tokens,
    # so that detail_features(projected=True) can give TG-DP's tiles as the image tokens the LLM reads
    projects_detail: ClassVar[bool] = True

    def detail_features(self, inputs: dict, scale: float, chosen: torch.Tensor | None = None, *,
                        originals: list | None = None, image_processor=None, projected: bool = False):
        """High-resolution features of every image, cut into side x side tiles (side = ceil(scale)) of
        the encoder's input size; all tiles of the batch (or each image's `chosen` (n, k) tiles,
        row-major) are encoded in one call. The tiles come from the `originals` (PIL images, one per
        image, as given to the processor; see original_tiles) when given, else from the processed
        image upscaled by `scale` (no detail beyond the processed image) and padded to whole tiles.
        `projected`: through the base's projector, as the LLM's own image tokens of each tile.
        Returns feats (n, T, D), mask (n, T) and each token's tile (n, T)."""
        images = self.base_images(inputs)
        size, side = images.shape[-1], math.ceil(scale)
        if chosen is None:
            chosen = torch.arange(side * side, device=images.device).expand(images.shape[0], -1)
        k = chosen.shape[1]
        if originals is not None:
            tiles = self.original_tiles(originals, scale, chosen, image_processor).to(images)
        else:
            up = F.interpolate(images, size=round(size * scale), mode="bilinear", align_corners=False)
            up = F.pad(up, (0, side * size - up.shape[-1], 0, side * size - up.shape[-2]))
            tiles = rearrange(up, "n c (sh h) (sw w) -> n (sh sw) c h w", sh=side, sw=side)
            tiles = tiles[torch.arange(tiles.shape[0], device=tiles.device)[:, None], chosen.to(tiles.device)]
            tiles = tiles.flatten(0, 1)
        feats = self.vision_features(tiles)
        feats = rearrange(self.projector()(feats) if projected else feats, "(n q) t d -> n (q t) d", q=k)
        tile = chosen.to(feats.device).repeat_interleave(feats.shape[1] // k, dim=1)
        mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        return feats, mask, tile

    def original_tiles(self, originals: list, scale: float, chosen: torch.Tensor, image_processor) -> torch.Tensor:
        """(n * k, C, S, S): the `chosen` (n, k) tiles of each original image, each prepared by the
        processor as it prepares a whole image. Tile (r, c) is the box of 1/scale of the processor's
        view of the image (its centre square where the processor centre-crops, else all of it) at row r,
        column c: the part of the upscaled image that the interpolating path cuts, at full detail."""
        if image_processor is None:
            raise AdapterError("TG-DP cuts its tiles from the original images with the VLM's processor: pass "
                               "processor=... (the model's AutoProcessor) to wrap()/load_adapters()")
        crops = []
        for image, picks in zip(originals, chosen.tolist()):
            boxes = self.tile_boxes(image, scale, image_processor)
            crops += [image.crop(at_least_one_pixel(boxes[t])) for t in picks]
        return self.base_images(image_processor(images=crops, return_tensors="pt"))

    def tile_boxes(self, image, scale: float, image_processor) -> list[tuple[int, ...]]:
        """The box of each of TG-DP's tiles (row-major) on an original image (see original_tiles)."""
        centre = crops_centre(image_processor)
        return [tile_box(image.size, t, scale, centre_crop=centre) for t in range(math.ceil(scale) ** 2)]

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
        """(n_images, h, w, llm_dim): each image's LLM-space tokens on their square grid (image_features),
        prefix tokens (a kept CLS) left out."""
        feats = torch.stack(list(self.image_features(inputs).pooler_output))
        layout = self.token_layout()
        if feats.shape[1] == layout.num_prefix + layout.grid[0] * layout.grid[1]:
            feats = feats[:, layout.num_prefix:]
            return rearrange(feats, "n (h w) d -> n h w d", h=layout.grid[0], w=layout.grid[1])
        side = math.isqrt(feats.shape[1])
        if side * side != feats.shape[1]:
            raise AdapterError(f"{self.family} projects an image to {feats.shape[1]} tokens: not a square grid; "
                               "its shim must define overview_tokens()")
        return rearrange(feats, "n (h w) d -> n h w d", h=side)

    def overview_cells(self, inputs: dict, image: int, run: int) -> torch.Tensor:
        """(h, w): the offset inside `image`'s placeholder run (of `run` tokens) of each token of the
        overview's grid, raster order (SemClip's attention scorer). Here: a run that is one square grid."""
        side = math.isqrt(run)
        if side * side != run:
            raise AdapterError(f"{self.family}: an image's run of {run} placeholder tokens is not one square grid; "
                               "its shim must define overview_cells() (where the overview's tokens are in the run)")
        return torch.arange(run).reshape(side, side)

    def overview_view(self, size: tuple[int, int], image_processor) -> tuple[float, float, float, float]:
        """The box of an original (w, h) image that the overview's grid shows: its centre square where
        the processor centre-crops (CLIP's), else all of it."""
        w, h = size
        if crops_centre(image_processor):
            side = min(w, h)
            return ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        return (0.0, 0.0, float(w), float(h))

    # -- vision blocks (TIE) ---------------------------------------------------------------------
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

        handle = Handle(None, watches=f"{self.family} vision blocks {blocks}")

        def hook_for(block: int):
            def hook(module, args, output):
                if not self._in_images:
                    return None
                handle.ran = True
                ctx = self._require_context()
                hidden = output[0] if isinstance(output, tuple) else output
                images = ctx.memo(("block_images", tuple(hidden.shape)),
                                  lambda: self.block_images(ctx.inputs, hidden).to(hidden.device))
                new = fn(block, hidden, images)
                return (new, *output[1:]) if isinstance(output, tuple) else new

            return hook

        # prepend: transformers' output-capturing hooks (LLaVA's hidden_states) must see the new output
        handles = [modules[b].register_forward_hook(hook_for(b), prepend=True) for b in blocks]
        handle._undo = lambda: [h.remove() for h in handles]
        return handle

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
            pixels = args[0] if args else kwargs.get("pixel_values")  # by position (Gemma 3) or by name
            if kept is not None and pixels is kept[0]:
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
        return self.hook_projector_input(lambda feats, ctx: feats + fn(
            self.row_images(ctx.inputs, feats.shape[0]).to(feats.device), None).to(feats.device, feats.dtype))

    def hook_projector_input(self, fn: Callable) -> Handle:
        """While image features are computed, replace the projector's first input with fn(feats, guidance)."""
        self._image_stage()
        handle = Handle(None, watches=f"{self.family} projector input ({self.spec.projector})")

        def pre_hook(module, args):
            if not self._in_images:
                return None
            handle.ran = True
            return (fn(args[0], self._require_context()), *args[1:])

        handle._undo = self.projector().register_forward_pre_hook(pre_hook).remove
        return handle

    def _require_context(self):
        ctx = self.context()
        if ctx is None:
            raise AdapterError("adapters ran without guidance: call the wrapped model, not its base")
        return ctx

    def remove(self) -> None:
        if self._stage_handle is not None:
            self._stage_handle.remove()
            self._stage_handle = None
