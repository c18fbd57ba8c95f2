"""The benchmark's stand-in for a pretrained CLIP: the tiny open_clip architecture, trained
contrastively on the world's crops and the names of objects in them ("the red triangle").

SemClip's scorer is a frozen pretrained CLIP with small trainable heads. No pretrained weights can
be downloaded here, and a random-init CLIP knows nothing of colours or shapes, so the benchmark
trains one once (cached as .safetensors beside the base VLM). It never sees marks, questions' answers
or the oracle: relevance to a question is still psi's to learn, from the oracle labels.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import torch

from ..semclip.boxes import propose_boxes
from ..progress import progress_bar
from .world import WorldConfig, make_samples

CLIP_SEED_OFFSET = 3_000_000
TEMPLATES = ("the {c} {s}", "a {c} {s}", "{c} {s}")


def _crop_and_text(sample, scales, rng: random.Random):
    """A candidate crop that holds a random object whole, and that object's name."""
    w, h = sample.image.size
    boxes = propose_boxes(w, h, scales=scales, overlap=0.1, min_size=1)
    obj = rng.choice(sample.objects)
    x0, y0, x1, y1 = obj.box
    holding = [b for b in boxes if b[0] <= x0 and b[1] <= y0 and x1 <= b[2] and y1 <= b[3]] or [(0, 0, w, h)]
    return rng.choice(holding), rng.choice(TEMPLATES).format(c=obj.colour, s=obj.shape)


def clip_weights(world: WorldConfig, arch: str, cache: Path, *, scales, steps: int = 300, batch_size: int = 64,
                 lr: float = 1e-3, seed: int = 0, progress: bool = True) -> Path:
    """Path of the world-trained CLIP's .safetensors (trained and cached on a miss)."""
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    from ..io import atomic_write
    from ..semclip.scorer import RelevanceScorer

    key = json.dumps(dict(world=world.fingerprint(), arch=arch, scales=scales, steps=steps, batch=batch_size,
                          lr=lr, seed=seed), sort_keys=True)
    from .base_model import ASSETS

    path = Path(cache) / f"clip-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():
        return path
    if (ASSETS / path.name).is_file():  # shipped with the package
        return ASSETS / path.name
    scorer = RelevanceScorer(arch=arch, seed=seed)  # its crop preparation is the one used at scoring time
    clip = scorer.frozen.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.1)
    loss_fn, rng = ClipLoss(), random.Random(seed)
    with progress_bar(progress) as bar:
        task = bar.add_task("training the scorer's CLIP", total=steps, info="")
        for step in range(steps):
            samples = make_samples(world, n=batch_size, seed=CLIP_SEED_OFFSET + seed + step)
            pairs = [_crop_and_text(s, scales, rng) for s in samples]
            images = torch.cat([scorer.crops(s.image, [box]) for s, (box, _) in zip(samples, pairs)])
            image_f, text_f, scale = clip(images, scorer.tokenizer([t for _, t in pairs]))
            loss = loss_fn(image_f, text_f, scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(task, advance=1, info=f"loss {loss.item():.3f}")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in clip.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp))
    return path
