"""A wrapped model in the user's own transformers.Trainer / trl.SFTTrainer script: only the adapters
train and are checkpointed (in our format), resume continues exactly, the saved adapter is the wrapper's."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import TrainingArguments

import vlm_adapters as va
from vlm_adapters.io import adapter_state
from vlm_adapters.tiny import build_tiny
from vlm_adapters.train.hf import AdapterTrainer, LlavaCollator

from .conftest import batch, logits

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
QUESTION = "What colour is the square?"
ADAPTER_FILES = {"README.md", "adapter_config.json", "adapter_model.safetensors"}
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}  # the Trainer's own


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for i, colour in enumerate(COLOURS):
        img = Image.new("RGB", (64, 48), "grey")
        ImageDraw.Draw(img).rectangle((8, 8, 30, 30), fill=colour)
        img.save(root / f"{i}.png")
    return root


RECORDS = [{"id": f"r{i}", "image": f"{i}.png", "conversations": [
    {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": f"The square is {c}."}]}
    for i, c in enumerate(COLOURS)]


def wrapped_model(family: str):
    model, processor = build_tiny(family)
    torch.manual_seed(0)
    return va.wrap(model, va.TGFOMConfig(hidden_size=32, num_heads=2), va.TIEConfig(num_heads=2, head_dim=16),
                   processor=processor)


def arguments(out, **extra) -> dict:
    return dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                learning_rate=1e-2, save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                gradient_checkpointing=True, dataloader_num_workers=0) | extra


def trainer_for(wrapped, out, images, **extra) -> AdapterTrainer:
    return AdapterTrainer(model=wrapped, args=TrainingArguments(**arguments(out, **extra)), train_dataset=RECORDS,
                          data_collator=LlavaCollator(wrapped, images))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])  # qwen2_vl: 3D (M-RoPE) positions
def test_trainer_checkpoints_hold_only_the_adapters(family, images, tmp_path):
    wrapped = wrapped_model(family)
    base_before = {k: v.clone() for k, v in wrapped.base_model.state_dict().items()}
    adapters_before = {k: v.clone() for k, v in adapter_state(wrapped).items()}
    trainer = trainer_for(wrapped, tmp_path / "run", images)
    trained = {id(p) for p in wrapped.trainable_parameters()}
    seen = [p for group in trainer.create_optimizer().param_groups for p in group["params"]]
    assert {id(p) for p in seen} == trained and len(seen) == len(trained)  # the optimizer sees the adapters only
    trainer.train()
    assert wrapped.base_model.get_decoder().gradient_checkpointing  # the Trainer turned it on through the wrapper

    for step in (2, 4):
        ckpt = tmp_path / "run" / f"checkpoint-{step}"
        assert {p.name for p in ckpt.iterdir()} == ADAPTER_FILES | TRAINER_FILES
        assert set(load_file(ckpt / "adapter_model.safetensors")) == set(adapter_state(wrapped))
        assert f"- step: {step}" in (ckpt / "README.md").read_text()
    final = load_file(tmp_path / "run" / "checkpoint-4" / "adapter_model.safetensors")
    state = adapter_state(wrapped)
    assert all(torch.equal(final[k], state[k]) for k in state)  # the saved adapter is the wrapper's
    assert any(not torch.equal(adapters_before[k], state[k]) for k in state), "the adapters did not train"
    assert all(torch.equal(base_before[k], v) for k, v in wrapped.base_model.state_dict().items()), "base moved"

    inputs = batch(wrapped.processor, [QUESTION])
    fresh, processor = build_tiny(family)
    loaded = va.AdaptedModel.from_pretrained(fresh, tmp_path / "run" / "checkpoint-4", processor=processor)
    torch.testing.assert_close(logits(loaded, inputs), logits(wrapped, inputs), rtol=0, atol=0)

    trainer.save_model(str(tmp_path / "final"))
    assert {p.name for p in (tmp_path / "final").iterdir()} == ADAPTER_FILES


def test_resume_from_checkpoint_equals_an_uninterrupted_run(images, tmp_path):
    whole = wrapped_model("qwen2_vl")
    trainer_for(whole, tmp_path / "whole", images).train()
    expected = adapter_state(whole)

    resumed = wrapped_model("qwen2_vl")  # a fresh process's view: the same script, started again
    shutil.copytree(tmp_path / "whole" / "checkpoint-2", tmp_path / "again" / "checkpoint-2")
    trainer_for(resumed, tmp_path / "again", images).train(resume_from_checkpoint=True)
    got = adapter_state(resumed)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not all(torch.equal(a, b) for a, b in zip(load_file(tmp_path / "again" / "checkpoint-2" /
                                                              "adapter_model.safetensors").values(), got.values()))


def test_a_checkpoint_without_adapters_is_refused(images, tmp_path):
    (tmp_path / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(va.AdapterError, match="adapter_config.json not found"):
        trainer_for(wrapped_model("llava"), tmp_path, images).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    with pytest.raises(va.AdapterError, match="give the wrapped model"):
        LlavaCollator(build_tiny("llava")[0])


def test_sft_trainer_trains_and_checkpoints_only_the_adapters(images, tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl", reason="the trl extra: pip install -e '.[trl]'")
    from vlm_adapters.train.hf import AdapterSFTTrainer

    wrapped = wrapped_model("llava")
    config = trl.SFTConfig(**arguments(tmp_path / "sft"), dataset_kwargs={"skip_prepare_dataset": True},
                           max_length=None)
    trainer = AdapterSFTTrainer(model=wrapped, args=config, train_dataset=datasets.Dataset.from_list(RECORDS),
                                data_collator=LlavaCollator(wrapped, images), processing_class=wrapped.processor)
    trainer.train()
    assert not (tmp_path / "sft" / "README.md").exists()  # no trl card for a full model; ours is in each checkpoint
    ckpt = tmp_path / "sft" / "checkpoint-4"
    assert {p.name for p in ckpt.iterdir()} == ADAPTER_FILES | TRAINER_FILES
    state, saved = adapter_state(wrapped), load_file(ckpt / "adapter_model.safetensors")
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)

    initial = adapter_state(wrapped_model("llava"))
    assert any(not torch.equal(initial[k], state[k]) for k in state), "the adapters did not train"
    sample = LlavaCollator(wrapped, images)(RECORDS[:2])
    with torch.no_grad():  # SFTTrainer's fused LM head runs inside the wrapper's guidance: the adapters' loss
        fused, plain = wrapped(**sample, fused_lm_head=True).loss, wrapped(**sample).loss
        with wrapped.disable_adapters():
            base = wrapped(**sample).loss
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    assert abs(plain - base) > 1e-4  # and the trained adapters change it

    trainer.release_fused_head()
    base = wrapped.unwrap()
    assert "forward" not in base.__dict__  # the base is given back as it was


def test_the_readme_script_runs(images, tmp_path):
    """The README's Trainer script, on a tiny LLaVA saved to disk, for 2 steps on the CPU."""
    import json
    import re
    from pathlib import Path

    from .conftest import save_tiny

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    script = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "AdapterTrainer(" in b)
    assert len(script.strip().splitlines()) <= 22
    save_tiny(tmp_path / "base")
    (tmp_path / "train.json").write_text(json.dumps(RECORDS))
    for old, new in (('"llava-hf/llava-1.5-7b-hf"', repr(str(tmp_path / "base"))), ('dtype="bfloat16"', 'dtype="float32"'),
                     ('"data/train.json"', repr(str(tmp_path / "train.json"))), ('"data/images"', repr(str(images))),
                     ("max_steps=1000", "max_steps=2, use_cpu=True"), ("bf16=True", "bf16=False"),
                     ("save_steps=200", "save_steps=1"), ('"runs/tgfom', f'"{tmp_path}/runs/tgfom')):
        assert old in script, old
        script = script.replace(old, new)
    exec(script, {})  # noqa: S102 - the README's own script
    final = tmp_path / "runs" / "tgfom" / "final"
    assert {p.name for p in final.iterdir()} == ADAPTER_FILES
    assert {p.name for p in (tmp_path / "runs" / "tgfom" / "checkpoint-2").iterdir()} == ADAPTER_FILES | TRAINER_FILES
