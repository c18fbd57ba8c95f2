"""`wrap(model, *configs)`: attach adapters to an off-the-shelf VLM without touching its weights.

The wrapped model is an nn.Module that holds the base (`base_model`, frozen), the adapters
(`adapters`, the only trainable parameters) and the frozen text encoders. Its `forward` and
`generate` take the base's inputs plus `guidance_text`; the question is encoded once per call and
read by the adapters' hooks, which run only while the image features are computed (prefill).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from .config import AdapterConfig, TextConfig, get_method
from .errors import AdapterError
from .text import TextFeatures, build_text_encoder
from .tokens import insert_after_images


class Guidance:
    """Per-call state the adapters read: inputs, questions, each image's sample, memoised work.

    `texts[i]` is None where sample i has no question; `missing` says why (a format string of i).
    """

    def __init__(self, inputs: dict, texts: list[str | None], image_sample: torch.Tensor, encoders: dict,
                 missing: str = "sample {i} has no question", kwargs: dict | None = None):
        self.inputs, self.texts, self.image_sample, self.missing = inputs, texts, image_sample, missing
        self.kwargs = kwargs or {}  # adapter inputs given to forward/generate (e.g. SemClip's images)
        self._encoders, self._memo = encoders, {}
        self.insertion = None  # set when adapters add tokens after the images

    def questions(self, default: str | None = None) -> list[str]:
        """Each sample's question; `default` (a generic query) stands in for missing ones."""
        texts = [default if t is None else t for t in self.texts]
        if None in texts:
            raise AdapterError(self.missing.format(i=texts.index(None)) + "; or give the adapter a generic "
                               "query where it has one (e.g. TIEConfig(generic_query='Describe the image.'))")
        if any(not isinstance(t, str) or not t.strip() for t in texts):
            raise AdapterError(f"every question must be a non-empty string, got {texts!r}")
        return texts

    def text(self, cfg: TextConfig, default: str | None = None) -> TextFeatures:
        """Features of each sample's question; `default` (a generic query) stands in for missing ones."""
        texts = self.questions(default)
        key = _text_key(cfg)
        used = key if texts == self.texts else f"{key}:{default}"
        return self.memo(used, lambda: self._encoders[key](texts))

    def memo(self, key, fn):
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def kept(self, key):
        """What memo(key, ...) holds (None: nothing yet)."""
        return self._memo.get(key)


def _text_key(cfg: TextConfig) -> str:
    return f"{cfg.backend}:{cfg.name}:{cfg.weights}:{cfg.seed}:{cfg.max_length}".replace(".", "_")


class AdaptedModel(nn.Module):
    def __init__(self, model: nn.Module, configs: tuple[AdapterConfig, ...], processor=None):
        super().__init__()
        from vlm_adapters.integrations import get_shim

        if isinstance(model, AdaptedModel):
            raise AdapterError("the model is already wrapped: pass all configs to one wrap() call")
        if not configs:
            raise AdapterError("wrap() needs at least one adapter config, e.g. TGFOMConfig()")
        for cfg in configs:
            if not isinstance(cfg, AdapterConfig):
                raise AdapterError(f"expected adapter configs such as TGFOMConfig(), got {type(cfg).__name__}")
        methods = [cfg.method for cfg in configs]
        if len(set(methods)) != len(methods):
            raise AdapterError(f"each method may appear once per wrap(), got {methods}")

        self.shim = get_shim(model)
        self.base_model = model
        self.processor = processor
        self.configs = list(configs)
        self.guidance: Guidance | None = None
        self._grad_state = {n: p.requires_grad for n, p in model.named_parameters()}
        model.requires_grad_(False)

        tokenizer = getattr(processor, "tokenizer", processor)
        device, dtype = model.device, model.dtype
        self.text_encoders = nn.ModuleDict()
        self.adapters = nn.ModuleDict()
        for cfg in configs:
            key = _text_key(cfg.text)
            if key not in self.text_encoders:
                self.text_encoders[key] = build_text_encoder(cfg.text, model, tokenizer).to(device)
            module = get_method(cfg.method).module_cls.build(cfg, self.shim, self.text_encoders[key])
            self.adapters[cfg.method] = module.to(device=device, dtype=dtype)
        self.shim.context = lambda: self.guidance
        self._handles = [h for module in self.adapters.values() for h in module.attach(self)]
        self._extra = [m for m in self.adapters.values() if hasattr(m, "extra_tokens")]
        self._call_kwargs = {k for m in self.adapters.values() for k in getattr(m, "call_kwargs", ())}
        if self._extra:
            hook = model.get_input_embeddings().register_forward_hook(self._fill_extra_tokens)
            self._handles.append(hook)

    # -- drop-in for the HF model ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.base_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base_model.dtype

    @property
    def config(self):
        return self.base_model.config

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base_model"], name)

    def forward(self, input_ids=None, *, guidance_text: list[str] | None = None, **inputs):
        """The base model's forward; outputs are at the caller's token positions even when
        adapters insert tokens into the prompt (the loss is computed on the grown prompt)."""
        with self._guided({"input_ids": input_ids, **inputs}, guidance_text) as (grown, insertion):
            out = self.base_model(**grown)
            if insertion is not None and getattr(out, "logits", None) is not None:
                out.logits = insertion.restore(out.logits)
            return out

    def generate(self, input_ids=None, *, guidance_text: list[str] | None = None, **inputs):
        """The base model's generate; returned sequences start with the caller's own prompt."""
        with self._guided({"input_ids": input_ids, **inputs}, guidance_text) as (grown, insertion):
            out = self.base_model.generate(**grown)
            if insertion is None:
                return out
            sequences = out if torch.is_tensor(out) else out.sequences
            sequences = torch.cat([input_ids, sequences[:, grown["input_ids"].shape[1]:]], dim=1)
            if torch.is_tensor(out):
                return sequences
            out.sequences = sequences
            return out

    @contextlib.contextmanager
    def _guided(self, inputs: dict, guidance_text: list[str] | None):
        """Set up the per-call guidance; yield the inputs to give the base (grown when adapters add
        tokens after the images) and the Insertion that maps outputs back."""
        if self.base_model is None:
            raise AdapterError("this wrapper was unwrapped; use the model unwrap() returned")
        kwargs = {k: inputs.pop(k) for k in self._call_kwargs if k in inputs}  # for the adapters
        inputs = {k: v for k, v in inputs.items() if v is not None}
        if inputs.get(self.shim.pixel_key) is None:  # text only, or a decode step: nothing to guide
            yield inputs, None
            return
        self.shim.check_pixels(inputs)
        ids = inputs.get("input_ids")
        ref = ids if ids is not None else inputs.get("inputs_embeds")
        batch = ref.shape[0]
        texts, missing = self._questions(inputs, guidance_text, batch)
        image_sample = self.shim.image_sample(inputs, batch).to(self.device)
        self.guidance = Guidance(inputs, texts, image_sample, self.text_encoders, missing, kwargs)
        try:
            grown, insertion = self._insert_extra_tokens(inputs)
            self.guidance.insertion = insertion
            yield grown, insertion
        finally:
            self.guidance = None

    def _insert_extra_tokens(self, inputs: dict):
        if not self._extra:
            return inputs, None
        if inputs.get("input_ids") is None:
            raise AdapterError(f"{[m.config.method for m in self._extra]} add tokens after each image: "
                               "pass input_ids, not inputs_embeds")
        if "position_ids" in inputs:
            raise AdapterError("adapters that add tokens recompute positions: do not pass position_ids")
        per_adapter = [m.extra_tokens(self) for m in self._extra]
        extra = [torch.cat([tokens[i] for tokens in per_adapter]) for i in range(len(per_adapter[0]))]
        if not any(len(e) for e in extra):  # e.g. SemClip with top_k=0: exactly the base model
            return inputs, None
        return insert_after_images(inputs, self.shim.image_run_ends(inputs["input_ids"]), extra,
                                   filler_id=self.shim.pad_token_id, pad_id=self.shim.pad_token_id)

    def _fill_extra_tokens(self, module, args, embedded):
        """Forward hook on the input embeddings: write the extra tokens into the grown prompt."""
        insertion = getattr(self.guidance, "insertion", None)
        ids = args[0] if args else None
        if insertion is None or ids is None or ids.shape != insertion.input_ids.shape:
            return None
        return insertion.fill(embedded) if torch.equal(ids, insertion.input_ids) else None

    def _questions(self, inputs: dict, guidance_text, batch: int) -> tuple[list[str | None], str]:
        """Each sample's question (None where it has none) and why one would be missing. The error
        is raised when an adapter asks for the text, so that one with a generic query can go on."""
        if guidance_text is not None:
            if isinstance(guidance_text, str) or len(guidance_text) != batch:
                raise AdapterError(
                    f"guidance_text must be a list with one question per sample ({batch}), "
                    f"got {guidance_text!r}"
                )
            return list(guidance_text), "guidance_text[{i}] is None: pass a question for every sample"
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if tokenizer is None or inputs.get("input_ids") is None:
            return [None] * batch, ("no question: pass guidance_text=[...] (one per sample), or wrap with "
                                    "processor=... so the question can be read from the prompt's input_ids")
        texts = self.shim.questions(inputs["input_ids"], inputs.get("attention_mask"), tokenizer, missing_ok=True)
        return texts, ("sample {i}: no question text after its image in the prompt; "
                       "pass guidance_text=[...] with one question per sample")

    # -- adapters ----------------------------------------------------------------------------------
    def trainable_parameters(self):
        return [p for p in self.adapters.parameters() if p.requires_grad]

    def print_trainable_parameters(self) -> None:
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    def save_adapters(self, path) -> None:
        from .io import save_adapters

        save_adapters(self, path)

    def unwrap(self) -> nn.Module:
        """Remove every hook and patch, restore requires_grad, and give back the base model."""
        base = self.base_model
        if base is None:
            raise AdapterError("already unwrapped")
        for handle in self._handles:
            handle.remove()
        self.shim.remove()
        for name, param in base.named_parameters():
            param.requires_grad_(self._grad_state.get(name, True))
        self._modules["base_model"] = None
        return base


def wrap(model: nn.Module, *configs: AdapterConfig, processor=None) -> AdaptedModel:
    """Attach the adapters in `configs` (any subset of methods) to a transformers VLM."""
    return AdaptedModel(model, configs, processor)
