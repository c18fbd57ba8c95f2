"""Fault injection: kills (os._exit in a forked child, like kill -9) at every commit point of
writing adapters and checkpoints. Whatever the point, a `step-*` directory is complete, an adapter
directory holds the old adapter or the new one (never a mix), and training resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vlm_adapters as va
from vlm_adapters import atomic
from vlm_adapters.tiny import build_tiny
from vlm_adapters.train import load_recipe, train
from vlm_adapters.train import checkpoint as ckpt

from .faults import run_killed
from .test_train import recipe_file, tensors_equal, ws  # noqa: F401  (ws: the shared training workspace)


def fake_checkpoint(out: Path, step: int, keep_last: int) -> None:
    """Write and commit a checkpoint the way the trainer does, with small stand-in contents."""
    staging = ckpt.begin(out, step)
    for name in ("adapter_model.safetensors", "rank-0.safetensors"):
        atomic.atomic_write(staging / name, lambda tmp: save_file({"w": torch.full((4,), float(step))}, tmp))
    stand_ins = {"adapter_config.json": {"adapters": [], "fingerprint": {}, "base_model": {}},
                 ckpt.STATE_FILE: {"step": step, "epoch": 0, "batch": 0, "accelerator_step": 0, "scheduler": {}},
                 "rank-0.json": {"params": [], "optimizer": {"state": {}, "param_groups": []},
                                 "rng": {"python": {}, "numpy": {}, "torch": {}}}}  # the shapes damage() checks
    for name, data in stand_ins.items():
        ckpt.write_json(staging / name, data)
    ckpt.commit(out, step, keep_last)


def step_of(directory: Path) -> int:
    return json.loads((directory / ckpt.STATE_FILE).read_text())["step"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_kill_at_any_point_of_checkpointing_leaves_only_complete_checkpoints(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)

    def run(out):
        for step in (1, 2):
            fake_checkpoint(out, step, keep_last=1)
        fake_checkpoint(out, 2, keep_last=0)  # a rerun over an existing step-2: swapped, never deleted first

    point, killed = 0, True
    while killed:
        point += 1
        out = tmp_path / f"k{point}"
        killed = run_killed(lambda: run(out), kill_at=point)
        found = ckpt.checkpoints(out)
        for step, directory in found:
            assert ckpt.damage(directory) is None, f"kill at point {point}: {directory.name} is incomplete"
            assert step_of(directory) == step
        if any(s >= 1 for s, _ in found) or not killed:
            assert ckpt.latest_intact(out) is not None
        fake_checkpoint(out, 9, keep_last=1)  # the next write clears what the kill left
        assert [p.name for p in (out / ckpt.CHECKPOINTS).iterdir()] == ["step-00000009"]
    assert point > 15, "the run has fewer commit points than expected: is the injection wired?"
    assert [s for s, _ in ckpt.checkpoints(out)] == [9]


def test_a_kill_while_saving_adapters_over_old_ones_leaves_old_or_new(tmp_path):
    model, processor = build_tiny("llava")
    old = va.wrap(model, va.TGFOMConfig(hidden_size=32, num_heads=2), processor=processor)
    target = tmp_path / "adapter"
    old.save_adapters(target)
    (target / "NOTES.md").write_text("mine")
    new = va.wrap(old.unwrap(), va.TGFOMConfig(hidden_size=16, num_heads=2), processor=processor)

    def saved_size() -> int:  # loads the directory as a whole: config and weights must belong together
        loaded = va.load_adapters(build_tiny("llava")[0], target, processor=processor)
        return loaded.configs[0].hidden_size

    point, killed = 0, True
    while killed:
        point += 1
        killed = run_killed(lambda: new.save_adapters(target), kill_at=point)
        assert saved_size() in (32, 16), f"kill at point {point}"
        assert (target / "NOTES.md").read_text() == "mine", "a file of the user's was lost"
    assert point > 3 and saved_size() == 16
    new.save_adapters(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "no staging or trash directory is left"


@pytest.fixture
def one_thread():
    """One intra-op thread for the whole test: forked children must use one (OpenMP does not survive
    fork), and the runs compared bit for bit must all compute the same way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_training_killed_while_checkpointing_resumes_exactly(ws, tmp_path, one_thread):  # noqa: F811
    straight = recipe_file(ws, tmp_path / "a", "a", train={"max_steps": 3, "grad_accum": 1},
                           output={"save_every": 1, "keep_last": 1})
    killed = load_recipe(recipe_file(ws, tmp_path / "b", "b", train={"max_steps": 3, "grad_accum": 1},
                                     output={"save_every": 1, "keep_last": 1}))
    reference = train(load_recipe(straight))
    out = tmp_path / "b"
    # each run resumes from what the kill before it left, and is killed at another point of checkpointing
    kills = [("replace", "rank-0.json", 2),  # writing step 2's files (step 1 committed)
             ("rename", "checkpoints/step-00000002", 1),  # committing step 2
             ("rmtree", ".trash", 1)]  # pruning step 1 after step 2 was committed
    for i, (kind, contains, occurrence) in enumerate(kills):
        assert run_killed(lambda: train(killed, resume=i > 0), kind=kind, contains=contains, occurrence=occurrence)
        assert all(ckpt.damage(d) is None for _, d in ckpt.checkpoints(out))
    resumed = train(killed, resume=True)
    assert resumed.step == 3 and resumed.status == "completed"
    for name in ("adapter_model.safetensors", "rank-0.safetensors"):  # weights, optimizer and RNG states
        assert tensors_equal(reference.checkpoint / name, resumed.checkpoint / name), name
    assert [s for s, _ in ckpt.checkpoints(out)] == [3]
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "log.jsonl repeats steps after the resumes"
