"""The family contract: a spec states every fact, registrations never overwrite, and an adapter
whose hook a forward bypassed is an error, never a silent no-op."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

import vlm_adapters as va
from vlm_adapters.config import get_method, register_method
from vlm_adapters.integrations import SHIMS, Shim, families, family_spec, register_shim
from vlm_adapters.integrations.llava import LlavaShim
from vlm_adapters.tiny import build_tiny

from .conftest import batch


class BrokenLlava(LlavaForConditionalGeneration):
    """A LLaVA whose shim points at modules its forward never runs through."""


def _broken(monkeypatch, **wrong):
    class BrokenShim(LlavaShim):
        spec = dataclasses.replace(LlavaShim.spec, family="broken", model_classes=("BrokenLlava",), **wrong)

    monkeypatch.setitem(SHIMS, "BrokenLlava", BrokenShim)
    model, processor = build_tiny("llava")
    model.__class__ = BrokenLlava
    model.model.spare = nn.Linear(32, 32)  # never called by the forward
    return model, processor


@pytest.mark.parametrize("config, wrong, named", [
    (va.TGFOMConfig(), {"projector": "model.spare"}, "tgfom"),
    (va.TIEConfig(), {"vision_blocks": "model.language_model.layers"}, "tie"),
])
def test_a_bypassed_hook_is_an_error(monkeypatch, config, wrong, named):
    model, processor = _broken(monkeypatch, **wrong)
    wrapped = va.wrap(model, config, processor=processor)
    assert type(wrapped.shim).__name__ == "BrokenShim"
    inputs = batch(processor, ["What colour is the square?"])
    with pytest.raises(va.AdapterError, match=rf"{named} .*never ran"):
        wrapped(**inputs)
    with pytest.raises(va.AdapterError, match="never ran"):
        wrapped.generate(**inputs, max_new_tokens=2)
    with wrapped.disable_adapters():  # the base itself runs
        wrapped(**inputs)


def test_the_right_spec_passes_the_same_check(monkeypatch):
    model, processor = _broken(monkeypatch)  # nothing wrong
    wrapped = va.wrap(model, va.TGFOMConfig(), va.TIEConfig(), va.TGDPConfig(), processor=processor)
    out = wrapped(**batch(processor, ["What colour is the square?"]))
    assert torch.isfinite(out.logits).all()


def test_duplicate_registrations_are_refused():
    with pytest.raises(va.AdapterError, match="already has a shim"):
        register_shim(LlavaShim)

    class Renamed(LlavaShim):
        spec = dataclasses.replace(LlavaShim.spec, model_classes=("SomethingNew",))

    with pytest.raises(va.AdapterError, match="family name 'llava' is taken"):
        register_shim(Renamed)
    assert "SomethingNew" not in SHIMS
    with pytest.raises(va.AdapterError, match="'tgfom' is registered already"):
        register_method("tgfom", va.TGFOMConfig, object)
    assert va.config.get_method("tgfom").module_cls is not object


def test_a_shim_without_spec_or_family_methods_fails_clearly():
    class NoSpec(Shim):
        pass

    with pytest.raises(va.AdapterError, match="has no FamilySpec"):
        register_shim(NoSpec)

    class OnlySpec(Shim):  # the base has no family defaults: what is not stated is an error
        spec = dataclasses.replace(LlavaShim.spec, family="only_spec")

    shim = OnlySpec(build_tiny("llava")[0])
    assert shim.projector() is shim.model.model.multi_modal_projector  # facts come from the spec
    for name in ("token_layout", "block_layout", "vision_features", "check_pixels"):
        with pytest.raises(va.AdapterError, match=f"does not define {name}"):
            getattr(shim, name)({})


def test_spec_paths_that_do_not_fit_name_the_missing_part():
    class Wrong(LlavaShim):
        spec = dataclasses.replace(LlavaShim.spec, family="wrong", projector="model.no_such_projector")

    with pytest.raises(va.AdapterError, match="no 'no_such_projector'"):
        Wrong(build_tiny("llava")[0]).projector()
    with pytest.raises(va.AdapterError, match="state where it is"):
        dataclasses.replace(LlavaShim.spec, vision_tower="")


def test_every_family_is_registered_with_a_spec():
    assert set(families()) >= {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "perception_lm"}
    for name, cls in SHIMS.items():
        assert name in cls.spec.model_classes


@pytest.mark.parametrize("family", [f for f in families() if family_spec(f).refuses])
def test_refused_methods_say_why_and_leave_the_base_as_it_was(family):
    model, processor = build_tiny(family)
    for method, reason in family_spec(family).refuses.items():
        config = get_method(method).config_cls()
        with pytest.raises(va.AdapterError, match=f"{method} is not available on {family}: .+"):
            va.wrap(model, va.TIEConfig(), config, processor=processor)
        assert all(p.requires_grad for p in model.parameters())  # the failed wrap unfroze it again
    assert va.wrap(model, va.TIEConfig(), processor=processor).adapters  # what fits still wraps
