"""Text guidance: turn each sample's question into pooled and token-level features, once.

Four frozen backends behind one interface (`TextEncoder(texts) -> TextFeatures`):
the VLM's own token embeddings (no extra model), an open_clip text tower, a transformers CLIP
text model, any transformers encoder (BERT-style, sentence-transformers; mean or CLS pooled). Text encoders are never trained and never saved with the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import TextConfig
from .devices import execution_device
from .errors import AdapterError, shorten
from .hub import load_errors, require_model, require_open_clip
from .inputs import check_text


@dataclass
class TextFeatures:
    pooled: torch.Tensor  # (B, D)
    tokens: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L), True where a real token is

    def select(self, index: torch.Tensor) -> "TextFeatures":
        """Rows in `index` order, e.g. one row per image from one row per sample."""
        return TextFeatures(self.pooled[index], self.tokens[index], self.mask[index])

    def constant_like(self) -> "TextFeatures":
        """Features that carry no information about the question (for ablations)."""
        return TextFeatures(torch.zeros_like(self.pooled), torch.zeros_like(self.tokens), self.mask)


class TextEncoder(nn.Module):
    """Frozen text encoder. Subclasses implement `encode`; `build_text_encoder` measures
    `pooled_dim` and `token_dim` (they differ for e.g. open_clip RN50) with one probe."""

    pooled_dim: int
    token_dim: int

    @torch.no_grad()
    def forward(self, texts: list[str]) -> TextFeatures:
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise AdapterError(f"every guidance text must be a non-empty string, got {shorten(texts)}")
        for i, text in enumerate(texts):
            check_text(text, f"guidance text {i}")
        return self.encode(texts)

    def encode(self, texts: list[str]) -> TextFeatures:
        raise NotImplementedError


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)


class VLMEmbeddingText(TextEncoder):
    """The VLM's own input embeddings of the question's tokens; pooled = their mean."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int):
        super().__init__()
        if tokenizer is None:
            raise AdapterError(
                "the 'vlm' text backend tokenizes the question with the VLM's tokenizer: "
                "pass processor=... to wrap()/load_adapters()"
            )
        self._embeddings = model.get_input_embeddings  # a bound method: not a submodule, not saved
        self.tokenizer, self.max_length = tokenizer, max_length

    def encode(self, texts: list[str]) -> TextFeatures:
        emb = self._embeddings()
        batch = self.tokenizer(
            texts, add_special_tokens=False, padding=True, truncation=True,
            max_length=self.max_length, return_tensors="pt",
        ).to(execution_device(emb))  # an offloaded base keeps its weights on the meta device
        tokens = emb(batch["input_ids"])
        mask = batch["attention_mask"].bool()
        return TextFeatures(_masked_mean(tokens, mask), tokens, mask)


class OpenClipText(TextEncoder):
    """An open_clip text tower; pooled = the model's projected text embedding."""

    def __init__(self, name: str, weights: str | None, seed: int):
        super().__init__()
        import open_clip

        if name not in open_clip.list_models():
            raise AdapterError(f"unknown open_clip architecture {shorten(name)}; see open_clip.list_models()")
        require_open_clip(name, "the text tower (text.name)")  # an HF tokenizer or text config it fetches
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # random init must be reproducible: it is not saved
            model = open_clip.create_model(name, pretrained=None)
        if weights:
            load_safetensors_into(model, weights, ignore="visual.")
        model.visual = None  # the image tower is never used here
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(name)

    def encode(self, texts: list[str]) -> TextFeatures:
        ids = self.tokenizer(texts).to(next(self.model.parameters()).device)
        out = self.model.forward_intermediates(text=ids, text_indices=1, normalize=False)
        tokens = out["text_intermediates"][-1]
        ln = getattr(self.model, "ln_final", None)
        tokens = ln(tokens) if ln is not None else tokens
        return TextFeatures(out["text_features"], tokens, ids != 0)


def _frozen_hf(model_class, name: str, what: str, example: str):
    """(frozen model, tokenizer) of a transformers text model: a hub id that is cached or reachable, or a
    directory saved with save_pretrained; safetensors weights only."""
    from transformers import AutoTokenizer

    require_model(name, "text encoder (text.name)")
    try:
        model = model_class.from_pretrained(name, use_safetensors=True).eval().requires_grad_(False)
        return model, AutoTokenizer.from_pretrained(name)
    except load_errors() as err:
        raise AdapterError(f"text.name={shorten(name)} is not {what} with safetensors weights and a tokenizer "
                           f"({str(err).splitlines()[0]}): give a directory saved with save_pretrained (model and "
                           f"tokenizer) or a hub id such as {example!r}") from None


class HFClipText(TextEncoder):
    """A transformers CLIP text model (hub id or local path); pooled = its pooler output."""

    def __init__(self, name: str, max_length: int):
        super().__init__()
        from transformers import CLIPTextModel

        self.model, self.tokenizer = _frozen_hf(CLIPTextModel, name, "a CLIP text model", "openai/clip-vit-large-patch14")
        self.max_length = min(max_length, self.model.config.max_position_embeddings)

    def encode(self, texts: list[str]) -> TextFeatures:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.model.device)
        out = self.model(**batch)
        return TextFeatures(out.pooler_output, out.last_hidden_state, batch["attention_mask"].bool())


class HFText(TextEncoder):
    """Any transformers encoder (hub id or local path): tokens = its last hidden states; pooled = their
    mean over the attention mask (the sentence-transformers recipe) or the first (CLS) token's."""

    def __init__(self, name: str, max_length: int, pooling: str | None):
        super().__init__()
        from transformers import AutoModel

        self.model, self.tokenizer = _frozen_hf(AutoModel, name, "a transformers encoder",
                                                "sentence-transformers/all-MiniLM-L6-v2")
        self.pooling = pooling or "mean"
        limit = getattr(self.model.config, "max_position_embeddings", None) or max_length
        self.max_length = min(max_length, limit)

    def encode(self, texts: list[str]) -> TextFeatures:
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.model.device)
        tokens = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].bool()
        pooled = _masked_mean(tokens, mask) if self.pooling == "mean" else tokens[:, 0]
        return TextFeatures(pooled, tokens, mask)


def load_safetensors_into(model: nn.Module, path: str, ignore: str | None = None) -> None:
    """Load a local .safetensors file into `model` (never a pickle); parameters under `ignore`
    may be missing from the file (e.g. the image tower when only text is used)."""
    from safetensors.torch import load_file

    from .weights import check_dtypes, check_shapes

    if not str(path).endswith(".safetensors"):
        raise AdapterError(f"{path}: only .safetensors files are loaded (never pickles)")
    try:
        state = load_file(path)
    except FileNotFoundError:
        raise AdapterError(f"weights file not found: {path}") from None
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise AdapterError(f"weights file {path} is not a valid safetensors file: {err}") from None
    own = model.state_dict()
    check_shapes(state, own, path)
    check_dtypes(state, own, path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (ignore and k.startswith(ignore))]
    if missing or unexpected:
        raise AdapterError(
            f"weights {path} do not fit this architecture: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def build_text_encoder(cfg: TextConfig, model: nn.Module, tokenizer) -> TextEncoder:
    if cfg.backend == "vlm":
        encoder = VLMEmbeddingText(model, tokenizer, cfg.max_length)
    elif cfg.backend == "open_clip":
        encoder = OpenClipText(cfg.name, cfg.weights, cfg.seed)
    elif cfg.backend == "hf_clip":
        encoder = HFClipText(cfg.name, cfg.max_length)
    else:
        encoder = HFText(cfg.name, cfg.max_length, cfg.pooling)
    probe = encoder(["a"])
    encoder.pooled_dim, encoder.token_dim = probe.pooled.shape[-1], probe.tokens.shape[-1]
    return encoder
