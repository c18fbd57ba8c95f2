"""Mixed adapter batches: `adapter_names=[...]`, one named set per sample, each sample's output equal
to running it with its set alone (and "__base__" to the base's)."""

from __future__ import annotations

import pytest
import torch

import vlm_adapters as va
from vlm_adapters.tiny import build_tiny

from .conftest import batch, logits

QUESTIONS = ["What colour is the square?", "Where is the dog?", "Is it raining?"]


def randomised(wrapped, seed: int):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in wrapped.trainable_parameters():
            p.add_(0.2 * torch.randn_like(p))
    return wrapped


@pytest.fixture(params=["llava", "qwen2_vl"])
def two_sets(request):
    model, processor = build_tiny(request.param)
    wrapped = randomised(va.wrap(model, va.TGFOMConfig(hidden_size=32, num_heads=2), processor=processor,
                                 adapter_name="a"), 1)
    wrapped.add_adapter("b", va.TIEConfig(num_heads=2, head_dim=16))
    with wrapped.using_adapter("b"):
        randomised(wrapped, 2)
    return wrapped, batch(processor, QUESTIONS)


def alone(wrapped, inputs, name: str, **kwargs):
    """The whole batch with one set active (or the adapters off for "__base__")."""
    if name == "__base__":
        with wrapped.disable_adapters():
            return logits(wrapped, inputs, **kwargs)
    with wrapped.using_adapter(name):
        return logits(wrapped, inputs, **kwargs)


def test_each_sample_gets_its_own_set(two_sets):
    wrapped, inputs = two_sets
    names = ["b", "__base__", "a"]
    mixed = logits(wrapped, inputs, adapter_names=names)
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone(wrapped, inputs, name)[i], rtol=0, atol=0)
    assert wrapped.active_adapter == "a"  # the active set is as it was
    a, b = alone(wrapped, inputs, "a"), alone(wrapped, inputs, "b")
    assert not torch.allclose(a[0], b[0]) and not torch.allclose(a[1], alone(wrapped, inputs, "__base__")[1])


def test_one_sample_alone_matches_its_row(two_sets):
    """A sample run by itself (batch of one) with its set matches its row of the mixed batch."""
    wrapped, inputs = two_sets
    mixed = logits(wrapped, inputs, adapter_names=["a", "b", "b"])
    one = batch(wrapped.processor, QUESTIONS[1:2])
    with wrapped.using_adapter("b"):
        single = logits(wrapped, one)
    mask = one["attention_mask"][0].bool()
    row = mixed[1][inputs["attention_mask"][1].bool()]
    torch.testing.assert_close(row[-mask.sum():], single[0][mask], rtol=1e-4, atol=1e-4)


def test_the_loss_is_over_every_samples_tokens_and_trains_each_set(two_sets):
    wrapped, inputs = two_sets
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    out = wrapped(**inputs, labels=labels, adapter_names=["a", "b", "a"])
    shift = labels[:, 1:]
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), shift.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    for name in ("a", "b"):
        with wrapped.using_adapter(name):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in wrapped.trainable_parameters()), name


def test_generate_with_mixed_sets(two_sets):
    wrapped, inputs = two_sets
    names = ["b", "a", "__base__"]
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False)
    mixed = wrapped.generate(**inputs, adapter_names=names, **kw)
    for i, name in enumerate(names):
        context = wrapped.disable_adapters() if name == "__base__" else wrapped.using_adapter(name)
        with context:
            assert torch.equal(mixed[i], wrapped.generate(**inputs, **kw)[i])


def test_bad_adapter_names_say_what_to_do(two_sets):
    wrapped, inputs = two_sets
    with pytest.raises(va.AdapterError, match="one set name per sample"):
        wrapped(**inputs, adapter_names=["a"])
    with pytest.raises(va.AdapterError, match=r"no adapter set named \['c'\]"):
        wrapped(**inputs, adapter_names=["a", "c", "b"])
