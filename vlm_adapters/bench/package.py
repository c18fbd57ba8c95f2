"""`vlm-adapters bench package`: put the default bases (and the scorer's CLIP) into the package.

Each regime's base is trained with its defaults (or taken from the cache), must meet the bar, and is
copied to `base_model.ASSETS` under its cache key, where `load_or_train` finds it before training.
The detail regime also ships the world-trained CLIP that SemClip's scorer uses. A fresh install then
runs `vlm-adapters demo` without training any base.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from .base_model import ASSETS, BaseConfig, cache_root, check_bar, load_or_train

REGIMES = ("detail", "where")  # what the demo shows


def package(regimes=REGIMES, cache=None, dest: Path = ASSETS, *, base: BaseConfig | None = None, progress: bool = True,
            echo=print) -> list[Path]:
    """Train or reuse each regime's default base (`base`'s settings if given), check its bar, and copy
    it (and the detail regime's CLIP) into `dest`. Returns the paths written."""
    from ..atomic import atomic_write, write_dir
    from .clip import clip_weights
    from .effect import EffectConfig, regime_world, scorer_arch

    dest, written = Path(dest), []
    for regime in regimes:
        world, config = regime_world(regime), dataclasses.replace(base or BaseConfig(), regime=regime)
        _, _, path, info = load_or_train(world, config, cache, progress=progress)
        check_bar(info["view_accuracy"], config, f" at {path}")
        target = dest / path.name
        if path.resolve() != target.resolve():
            write_dir(target, lambda tmp, src=path: shutil.copytree(src, tmp, dirs_exist_ok=True), keep_others=False)
        written.append(target)
        if regime == "detail":
            effect = EffectConfig(world=world, base=config)
            clip = clip_weights(world, scorer_arch(effect), cache_root(cache), scales=config.scales, steps=effect.clip_steps,
                                progress=progress)
            if clip.resolve() != (dest / clip.name).resolve():
                atomic_write(dest / clip.name, lambda tmp, src=clip: shutil.copyfile(src, tmp))
            written.append(dest / clip.name)
        echo(f"{regime}: {target} ({sum(f.stat().st_size for f in target.iterdir()) / 1e6:.1f} MB)")
    return written
