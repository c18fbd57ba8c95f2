"""What the frozen detail base reads in TG-DP's slot (after the overview's tokens), with no training.

For held-out canvases of the default detail world, the base's answer accuracy when the slot holds
  a  the 36 projected image tokens of the quadrant (TG-DP's tile at upscale 2) that holds the target,
  b  their mean, repeated 16 times (16 latents),
  c  the mean of the target's own tokens (the cells that touch its box), repeated 16 times,
  d  the mean of all four tiles' tokens, repeated 16 times,
  e  nothing (the base alone).
Run: .venv/bin/python benchmarks/tgdp_slot_probe.py   (about 2 min on one CPU core)
"""

import statistics

import torch

from vlm_adapters.bench.base_model import BaseConfig, load_or_train
from vlm_adapters.bench.effect import regime_world
from vlm_adapters.bench.world import make_samples
from vlm_adapters.inputs import chat_prompt
from vlm_adapters.integrations import get_shim
from vlm_adapters.integrations.base import tile_box
from vlm_adapters.processing import process


def tile_tokens(shim, processor, image, tile: int) -> torch.Tensor:
    crop = image.crop(tile_box(image.size, tile, 2.0))
    return shim.encode_images(processor.image_processor(images=[crop], return_tensors="pt"))[0]


def answer(model, shim, processor, sample, extra: torch.Tensor, ids: list[int]) -> int:
    """Index of the best of the answers' first tokens, with `extra` after the overview's tokens."""
    inputs = process(processor, [chat_prompt(processor, sample.question)], [sample.image])
    emb = model.get_input_embeddings()(inputs["input_ids"])
    overview = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    overview = torch.cat(list(overview)) if isinstance(overview, (list, tuple)) else overview.flatten(0, 1)
    emb = emb.masked_scatter((inputs["input_ids"] == shim.image_token_id)[..., None], overview.to(emb))
    end = int(shim.image_run_ends(inputs["input_ids"])[0, 1])
    emb = torch.cat([emb[:, :end], extra[None].to(emb), emb[:, end:]], 1)
    hidden = model.model.language_model(inputs_embeds=emb).last_hidden_state
    return int(model.lm_head(hidden[:, -1])[0, ids].argmax())


def main(n: int = 120) -> None:
    torch.set_num_threads(1)
    world = regime_world("detail")
    model, processor, _, _ = load_or_train(world, BaseConfig(regime="detail"), progress=False)
    shim = get_shim(model, processor.tokenizer)
    samples = make_samples(world, n, seed=999)
    answers = sorted({s.answer for s in samples})
    ids = [processor.tokenizer(f" {a}", add_special_tokens=False)["input_ids"][0] for a in answers]
    hits = {k: [] for k in "abcde"}
    with torch.no_grad():
        for s in samples:
            (w, h), (x0, y0, x1, y1) = s.image.size, s.box
            tile = int((y0 + y1) / 2 >= h / 2) * 2 + int((x0 + x1) / 2 >= w / 2)
            tokens = tile_tokens(shim, processor, s.image, tile)
            side, box = int(len(tokens) ** 0.5), tile_box(s.image.size, tile, 2.0)
            cell = (box[2] - box[0]) / side
            own = [r * side + c for r in range(side) for c in range(side)
                   if box[0] + c * cell < x1 and box[0] + (c + 1) * cell > x0
                   and box[1] + r * cell < y1 and box[1] + (r + 1) * cell > y0]
            every = torch.cat([tile_tokens(shim, processor, s.image, t) for t in range(4)])
            slots = {"a": tokens, "b": tokens.mean(0, keepdim=True).expand(16, -1),
                     "c": tokens[own].mean(0, keepdim=True).expand(16, -1),
                     "d": every.mean(0, keepdim=True).expand(16, -1), "e": tokens[:0]}
            for key, extra in slots.items():
                hits[key].append(answers[answer(model, shim, processor, s, extra, ids)] == s.answer)
    for key, values in hits.items():
        print(key, f"{statistics.fmean(values):.1%}")


if __name__ == "__main__":
    main()
