"""`wrap(model, *configs)`: attach adapters to an off-the-shelf VLM without touching its weights.

The wrapped model is an nn.Module that holds the base (`base_model`, frozen), the adapters
(`adapters`, the only trainable parameters) and the frozen text encoders. Its `forward` and
`generate` take the base's inputs plus `guidance_text`; the question is encoded once per call and
read by the adapters' hooks, which run only while the image features are computed (prefill).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .base_state import BaseSnapshot, hold, holder, release
from .config import AdapterConfig, TextConfig, config_from_dict, get_method
from .devices import execution_device
from .errors import AdapterError, shorten
from .io import CONFIG_NAME, RESERVED_SET_NAMES, load_weights, read_config, save_adapters
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
            raise AdapterError(f"every question must be a non-empty string, got {shorten(texts)}")
        return texts

    def text(self, cfg: TextConfig, default: str | None = None) -> TextFeatures:
        """Features of each sample's question; `default` (a generic query) stands in for missing ones."""
        texts = self.questions(default)
        key = cfg.key
        used = key if texts == self.texts else f"{key}:{default}"
        return self.memo(used, lambda: self._encoders[key](texts))

    def memo(self, key, fn):
        if key not in self._memo:
            self._memo[key] = fn()
        return self._memo[key]

    def kept(self, key):
        """What memo(key, ...) holds (None: nothing yet)."""
        return self._memo.get(key)


DEFAULT_ADAPTER = "default"


@dataclass
class AdapterSet:
    """One named set of adapters: their configs and modules (method -> module)."""

    configs: list[AdapterConfig]
    modules: nn.ModuleDict


class AdaptedModel(nn.Module):
    """A base VLM with named adapter sets, one active (peft's lifecycle): `adapters` is the active
    set's modules, `configs` its configs; the others wait, unhooked, until `set_adapter(name)`."""

    def __init__(self, model: nn.Module, configs: tuple[AdapterConfig, ...], processor=None,
                 adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        from vlm_adapters.integrations import get_shim

        if isinstance(model, AdaptedModel):
            raise AdapterError("the model is already wrapped: pass all configs to one wrap() call, or add a "
                               "named set with wrapped.add_adapter(name, *configs)")
        if (held_by := holder(model)) is not None:
            raise AdapterError(f"this base is already held by {held_by.describe()}: use that wrapper (add sets "
                               "with its add_adapter / load_adapters), or call its unwrap() first")
        _check_configs(configs)
        self.shim = get_shim(model, getattr(processor, "tokenizer", processor))
        self.base_model = model
        self.processor = processor
        self.guidance: Guidance | None = None
        self._snapshot = BaseSnapshot(model)
        self._sets: dict[str, AdapterSet] = {}
        self._handles: list = []
        self._watched: list = []  # (method, Handle) of hooks that must run in every forward with images
        self._extra: list = []
        self._disabled = False
        self.text_encoders = nn.ModuleDict()
        self.shim.context = lambda: self.guidance
        model.requires_grad_(False)
        try:
            self._sets[_check_name(adapter_name)] = self._build_set(configs)
            self.active_adapter = adapter_name
            self.adapters = self._sets[adapter_name].modules
            self._attach()
        except BaseException:  # e.g. an adapter that cannot attach: leave the base as it was
            self._detach()
            self._snapshot.restore()
            raise
        hold(model, self)

    def _build_set(self, configs) -> AdapterSet:
        """Build each config's adapter on the device of the base module it hooks (a split base
        keeps each adapter beside its module), in the base's dtype."""
        model = self.base_model
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        home = execution_device(model.get_input_embeddings())  # where the prompt's embeddings are
        modules = nn.ModuleDict()
        for cfg in configs:
            if cfg.method in self.shim.spec.refuses:
                raise AdapterError(f"{cfg.method} is not available on {self.shim.family}: "
                                   f"{self.shim.spec.refuses[cfg.method]}")
            key = cfg.text.key
            if key not in self.text_encoders:
                self.text_encoders[key] = build_text_encoder(cfg.text, model, tokenizer).to(home)
            module = get_method(cfg.method).module_cls.build(cfg, self.shim, self.text_encoders[key])
            module.to(device=home, dtype=model.dtype)
            if hasattr(module, "place"):
                module.place(self.shim)
            modules[cfg.method] = module
        return AdapterSet(list(configs), modules)

    def _attach(self) -> None:
        """Install the active set's hooks and patches on the base."""
        self._handles, self._watched = [], []
        for method, module in self.adapters.items():
            handles = module.attach(self)
            self._handles += handles  # one by one: a failure leaves only these to remove
            self._watched += [(method, h) for h in handles if getattr(h, "watches", None)]
        self._extra = [m for m in self.adapters.values() if hasattr(m, "extra_tokens")]
        if self._extra:
            hook = self.base_model.get_input_embeddings().register_forward_hook(self._fill_extra_tokens)
            self._handles.append(hook)

    def _detach(self) -> None:
        """Remove every hook and patch: the base runs as itself."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._extra, self._watched = [], [], []
        self.shim.remove()

    def describe(self) -> str:
        sets = "; ".join(f"{name}{' (active)' if name == self.active_adapter else ''}: "
                         f"{', '.join(c.method for c in s.configs)}" for name, s in self._sets.items())
        return f"the AdaptedModel at {hex(id(self))} (adapter sets {sets})"

    def _apply(self, fn, recurse=True):
        """.to() / .half() / .cuda() reach the waiting sets too."""
        super()._apply(fn, recurse)
        for name, adapter_set in self._sets.items():
            if name != self.active_adapter:
                adapter_set.modules._apply(fn, recurse)
        return self

    # -- drop-in for the HF model ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the base's input embeddings (its first device when split)."""
        if self.base_model is None:
            raise AdapterError("this wrapper was unwrapped; use the model unwrap() returned")
        return execution_device(self.base_model.get_input_embeddings())

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

    def forward(self, input_ids=None, *, guidance_text: list[str] | None = None,
                adapter_names: list[str] | None = None, **inputs):
        """The base model's forward; outputs are at the caller's token positions even when
        adapters insert tokens into the prompt (the loss is computed on the grown prompt).
        `adapter_names`: one set name per sample ("__base__": none), a mixed batch (vlm_adapters.mixed)."""
        if adapter_names is not None:
            from .mixed import mixed_forward

            return mixed_forward(self, adapter_names, input_ids, guidance_text, inputs)
        with self._guided({"input_ids": input_ids, **inputs}, guidance_text) as (grown, insertion):
            out = self.base_model(**grown)
            if insertion is not None and getattr(out, "logits", None) is not None:
                out.logits = insertion.restore(out.logits)
            return out

    def generate(self, input_ids=None, *, guidance_text: list[str] | None = None,
                 adapter_names: list[str] | None = None, **inputs):
        """The base model's generate; returned sequences start with the caller's own prompt.
        `adapter_names`: one set name per sample, as in forward."""
        new = inputs.get("max_new_tokens")
        if new is not None and (not isinstance(new, int) or isinstance(new, bool) or new < 1):
            raise AdapterError(f"generate(max_new_tokens={shorten(new)}): give a whole number >= 1 (the tokens to "
                               "add); for the prompt's own scores call the model (forward) instead")
        if adapter_names is not None:
            from .mixed import mixed_generate

            return mixed_generate(self, adapter_names, input_ids, guidance_text, inputs)
        with self._guided({"input_ids": input_ids, **inputs}, guidance_text) as (grown, insertion):
            try:
                out = self.base_model.generate(**grown)
            except ValueError as err:
                if isinstance(err, AdapterError):
                    raise
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise AdapterError(f"generate: {shorten(first, 300)}") from None  # transformers' check of the settings
            if insertion is None:
                return out
            sequences = out if torch.is_tensor(out) else out.sequences
            per_prompt = sequences.shape[0] // input_ids.shape[0]  # num_return_sequences: rows repeat each prompt
            prompts = input_ids.repeat_interleave(per_prompt, dim=0).to(sequences.device)
            sequences = torch.cat([prompts, sequences[:, grown["input_ids"].shape[1]:]], dim=1)
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
        kwargs = {k: inputs.pop(k) for k in self._call_kwargs() if k in inputs}  # for the adapters
        inputs = {k: v for k, v in inputs.items() if v is not None}
        if self._disabled or inputs.get(self.shim.pixel_key) is None:  # adapters off, text only, or decode
            yield inputs, None
            return
        self.shim.check_pixels(inputs)
        ids = inputs.get("input_ids")
        ref = ids if ids is not None else inputs.get("inputs_embeds")
        batch = ref.shape[0]
        texts, missing = self._questions(inputs, guidance_text, batch)
        image_sample = self.shim.image_sample(inputs, batch).to(self.device)
        self.guidance = Guidance(inputs, texts, image_sample, self.text_encoders, missing, kwargs)
        for _, handle in self._watched:
            handle.ran = False
        try:
            grown, insertion = self._insert_extra_tokens(inputs)
            self.guidance.insertion = insertion
            yield grown, insertion
            self._check_hooks_ran(insertion)
        finally:
            self.guidance = None

    def _check_hooks_ran(self, insertion) -> None:
        """An adapter whose hook did not run did nothing: refuse the output instead of returning the base's."""
        missed = [f"{method} ({handle.watches})" for method, handle in self._watched if not handle.ran]
        if insertion is not None and not insertion.filled:
            missed.append("extra tokens (the input-embedding hook)")
        if missed:
            raise AdapterError(
                f"{', '.join(missed)}: the hook never ran in this forward, so the adapter would silently do "
                f"nothing; {type(self.base_model).__name__}'s forward bypasses what {type(self.shim).__name__} "
                "hooks: fix the family's spec (integrations/)")

    def _insert_extra_tokens(self, inputs: dict):
        if not self._extra:
            return inputs, None
        if inputs.get("input_ids") is None:
            raise AdapterError(f"{[m.config.method for m in self._extra]} add tokens after each image: "
                               "pass input_ids, not inputs_embeds")
        if "position_ids" in inputs:
            raise AdapterError("adapters that add tokens recompute positions: do not pass position_ids")
        per_adapter = [m.extra_tokens(self) for m in self._extra]
        extra = [torch.cat([tokens[i].to(self.device) for tokens in per_adapter])  # a split base: one device
                 for i in range(len(per_adapter[0]))]
        if not any(len(e) for e in extra):  # e.g. SemClip with top_k=0: exactly the base model
            return inputs, None
        return insert_after_images(inputs, self.shim.image_run_ends(inputs["input_ids"]), extra,
                                   filler_id=self.shim.pad_token_id, pad_id=self.shim.pad_token_id)

    def _fill_extra_tokens(self, module, args, embedded):
        """Forward hook on the input embeddings: write the extra tokens into the grown prompt."""
        insertion = getattr(self.guidance, "insertion", None)
        ids = args[0] if args else None
        if insertion is None or ids is None:
            return None
        target = insertion.for_ids(ids)  # the grown prompt, or it repeated by generate (beams, samples)
        if target is None:
            return None
        insertion.filled = True
        return target.fill(embedded)

    def _questions(self, inputs: dict, guidance_text, batch: int) -> tuple[list[str | None], str]:
        """Each sample's question (None where it has none) and why one would be missing. The error
        is raised when an adapter asks for the text, so that one with a generic query can go on."""
        if guidance_text is not None:
            if isinstance(guidance_text, str) or len(guidance_text) != batch:
                raise AdapterError(
                    f"guidance_text must be a list with one question per sample ({batch}), "
                    f"got {shorten(guidance_text)}"
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
    def _call_kwargs(self) -> set[str]:
        """Inputs meant for adapters (e.g. SemClip's images): never passed to the base, in any set."""
        return {k for s in self._sets.values() for m in s.modules.values() for k in getattr(m, "call_kwargs", ())}

    @property
    def wants_images(self) -> bool:
        """True if an adapter takes the original images (`images=[...]` at each call: SemClip, TG-DP)."""
        return "images" in self._call_kwargs()

    @property
    def configs(self) -> list[AdapterConfig]:
        """The active set's configs."""
        return self._sets[self.active_adapter].configs

    @configs.setter
    def configs(self, value: list[AdapterConfig]) -> None:
        self._sets[self.active_adapter].configs = list(value)

    @property
    def adapter_names(self) -> list[str]:
        return list(self._sets)

    def trainable_parameters(self):
        """The active set's trainable parameters."""
        return [p for p in self.adapters.parameters() if p.requires_grad]

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as peft gives them: every set, the base, text encoders."""
        params = {id(p): p for p in self.parameters()}
        params.update({id(p): p for s in self._sets.values() for p in s.modules.parameters()})
        trainable = total = 0
        for p in params.values():
            n = p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)  # bitsandbytes packs two per byte
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || "
              f"trainable%: {100 * trainable / max(total, 1):.4f}")

    def add_adapter(self, adapter_name: str, *configs: AdapterConfig) -> None:
        """Add a fresh named set (inactive until set_adapter(adapter_name))."""
        self._require_base()
        if _check_name(adapter_name) in self._sets:
            raise AdapterError(f"an adapter set named {shorten(adapter_name)} exists: delete_adapter({shorten(adapter_name)}) "
                               "first, or choose another name")
        _check_configs(configs)
        self._sets[adapter_name] = self._build_set(configs)

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the active set: its hooks run, its parameters are `adapters`."""
        self._require_base()
        self._require_set(adapter_name)
        previous = self.active_adapter
        if adapter_name == previous:
            return
        try:
            self._activate(adapter_name)
        except BaseException:  # a set that cannot attach: the previous one comes back
            self._activate(previous)
            raise

    def _activate(self, adapter_name: str) -> None:
        self._detach()
        self.active_adapter = adapter_name
        self.adapters = self._sets[adapter_name].modules
        if not self._disabled:
            self._attach()

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop a named set; deleting the active one activates the first of the others."""
        self._require_set(adapter_name)
        if len(self._sets) == 1:
            raise AdapterError(f"{shorten(adapter_name)} is the only adapter set: unwrap() gives the base back instead")
        if adapter_name == self.active_adapter:
            self.set_adapter(next(n for n in self._sets if n != adapter_name))
        del self._sets[adapter_name]

    def load_adapters(self, path, adapter_name: str = DEFAULT_ADAPTER) -> "AdaptedModel":
        """Load a saved adapter directory as the named set `adapter_name` (inactive until set_adapter)."""
        return load_adapters(self, path, adapter_name=adapter_name)

    load_adapter = load_adapters  # peft's name

    @contextlib.contextmanager
    def using_adapter(self, adapter_name: str):
        """Within it, `adapter_name` is the active set; the previous one comes back after."""
        previous = self.active_adapter
        self.set_adapter(adapter_name)
        try:
            yield self
        finally:
            if self.base_model is not None and previous in self._sets:
                self.set_adapter(previous)

    @contextlib.contextmanager
    def disable_adapters(self):
        """Within it, the wrapped model is exactly its base: no hook, no patch, no extra token."""
        self._require_base()
        if self._disabled:
            yield self
            return
        self._detach()
        self._disabled = True
        try:
            yield self
        finally:
            self._disabled = False
            if self.base_model is not None:
                self._attach()

    disable_adapter = disable_adapters  # peft's name

    def _require_set(self, adapter_name: str) -> None:
        if adapter_name not in self._sets:
            raise AdapterError(f"no adapter set named {shorten(adapter_name)}; this model has {self.adapter_names}")

    def _require_base(self) -> None:
        if self.base_model is None:
            raise AdapterError("this wrapper was unwrapped; use the model unwrap() returned")

    # -- saving and loading (peft's names) ----------------------------------------------------------
    def save_adapters(self, path) -> None:
        """The active set's adapter directory (adapter_config.json + adapter_model.safetensors)."""
        save_adapters(self, path)

    def save_pretrained(self, save_directory, selected_adapters: list[str] | None = None, **kwargs) -> None:
        """Write the adapters, never the base, as peft does: the `default` set in `save_directory`,
        every other set in `save_directory/<name>`."""
        from .pretrained import save_pretrained

        save_pretrained(self, save_directory, selected_adapters, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the adapters (never the base) to a Hugging Face Hub model repo."""
        from .pretrained import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id, adapter_name: str = DEFAULT_ADAPTER, *, processor=None,
                        revision: str | None = None, token: str | None = None) -> "AdaptedModel":
        """Wrap `model` with the adapters saved at `model_id`: a directory (adapter directory, training
        output or checkpoint) or a Hub repo id."""
        from .pretrained import from_pretrained

        return from_pretrained(model, model_id, adapter_name, processor=processor, revision=revision, token=token)

    def unwrap(self) -> nn.Module:
        """Remove every hook and patch, restore requires_grad, train/eval modes, checkpointing flags and
        any layer LoRA replaced, and give back the base model exactly as it was."""
        base = self.base_model
        if base is None:
            raise AdapterError("already unwrapped")
        self._detach()
        self._snapshot.restore()
        release(base)
        self._modules["base_model"] = None
        return base


def _check_configs(configs) -> None:
    if not configs:
        raise AdapterError("wrap() needs at least one adapter config, e.g. TGFOMConfig()")
    for cfg in configs:
        if not isinstance(cfg, AdapterConfig):
            raise AdapterError(f"expected adapter configs such as TGFOMConfig(), got {type(cfg).__name__}")
    methods = [cfg.method for cfg in configs]
    if len(set(methods)) != len(methods):
        raise AdapterError(f"each method may appear once per wrap(), got {methods}")


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise AdapterError(f"adapter_name={shorten(name)}: use letters, digits, '_' and '-' (it names a directory)")
    if name.lower() in RESERVED_SET_NAMES:
        raise AdapterError(f"adapter_name={shorten(name)} is reserved: save_pretrained writes the set into a subdirectory "
                           f"of that name, where the library keeps its own files ({', '.join(RESERVED_SET_NAMES)}); "
                           "choose another name")
    return name


def wrap(model: nn.Module, *configs: AdapterConfig, processor=None,
         adapter_name: str = DEFAULT_ADAPTER) -> AdaptedModel:
    """Attach the adapters in `configs` (any subset of methods) to a transformers VLM, as the named
    set `adapter_name`."""
    return AdaptedModel(model, configs, processor, adapter_name)


def load_adapters(model, path, processor=None, adapter_name: str = "default"):
    """Rebuild the wrapped model saved at `path` on top of `model` (the same base), as the set
    `adapter_name`; `model` may be a wrapper already: the set is added to it (inactive)."""
    meta = read_config(path)  # the format: io.py
    try:
        configs = [config_from_dict(d) for d in meta["adapters"]]
    except AdapterError as err:
        raise AdapterError(f"{Path(path) / CONFIG_NAME}: {err}") from None
    if isinstance(model, AdaptedModel):
        model.add_adapter(adapter_name, *configs)
        try:
            with model.using_adapter(adapter_name):
                load_weights(model, path, meta)
        except BaseException:
            model.delete_adapter(adapter_name)  # leave the wrapper as it was
            raise
        return model
    wrapped = wrap(model, *configs, processor=processor, adapter_name=adapter_name)
    try:
        load_weights(wrapped, path, meta)
    except BaseException:
        wrapped.unwrap()  # leave the caller's model as it was
        raise
    return wrapped
