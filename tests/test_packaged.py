"""Shipped bases: `bench package` puts a base (and the scorer's CLIP) where a fresh install finds it
before training, and only a base that meets its bar; the bases shipped in the package meet their
bar on canvases they never saw."""

import pytest

from vlm_adapters.bench import base_model
from vlm_adapters.bench.base_model import (ASSETS, CHECK_SEED, FOCUS, BaseConfig, check_bar, load_or_train,
                                           view_accuracies)
from vlm_adapters.bench.effect import regime_world
from vlm_adapters.bench.package import REGIMES, package
from vlm_adapters.bench.world import make_samples
from vlm_adapters.errors import AdapterError

TINY = BaseConfig(size="tiny", steps=1, batch_size=2, check_every=1, check_samples=2, min_focus=0.0, min_gap=-1.0)


def _no_training(*args, **kwargs):
    pytest.fail("a base was trained although one is shipped")


def test_package_ships_a_base_that_later_loads_without_training(tmp_path, monkeypatch):
    dest = tmp_path / "assets"
    written = package(("where",), tmp_path / "cache", dest, base=TINY, progress=False, echo=lambda *_: None)
    assert [p.parent for p in written] == [dest] and (written[0] / "model.safetensors").is_file()
    monkeypatch.setattr(base_model, "ASSETS", dest)
    monkeypatch.setattr(base_model, "train_base", _no_training)
    _, _, path, _ = load_or_train(regime_world("where"), BaseConfig(**{**TINY.__dict__, "regime": "where"}),
                                  tmp_path / "empty-cache", progress=False)
    assert path == written[0]


def test_package_refuses_a_base_below_its_bar(tmp_path):
    strict = BaseConfig(**{**TINY.__dict__, "min_focus": 0.99})
    with pytest.raises(AdapterError, match="fails the benchmark's bar"):
        package(("where",), tmp_path / "cache", tmp_path / "assets", base=strict, progress=False)
    assert not (tmp_path / "assets").exists()


@pytest.mark.parametrize("regime", REGIMES)
def test_shipped_base_meets_its_bar_on_fresh_canvases(regime, tmp_path, monkeypatch):
    monkeypatch.setattr(base_model, "train_base", _no_training)
    world, base = regime_world(regime), BaseConfig(regime=regime)
    model, processor, path, _ = load_or_train(world, base, tmp_path, progress=False)
    assert path.parent == ASSETS
    samples = make_samples(world, 128, seed=CHECK_SEED + 7)  # neither the checks' nor the bar's canvases
    check_bar(view_accuracies(model, processor, samples, base, world, views=(FOCUS[regime], "overview")), base)
