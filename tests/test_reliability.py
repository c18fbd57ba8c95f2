"""Reliability rows of issue 14: finite weights only, clean errors for damaged or hostile files,
resume that falls back to an intact checkpoint and honours changed settings, disk full."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlm_adapters as va
from vlm_adapters import atomic
from vlm_adapters.errors import AdapterError
from vlm_adapters.tiny import build_tiny
from vlm_adapters.train import NonFiniteLoss, load_recipe, train
from vlm_adapters.train import checkpoint as ckpt

from .test_train import recipe_file, ws  # noqa: F401  (ws: the shared training workspace)

SMALL = {"hidden_size": 32, "num_heads": 2}


# -- writes -------------------------------------------------------------------------------------------
def test_atomic_write_fsyncs_file_and_directory_and_never_touches_the_umask(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(os, "umask", lambda *a: pytest.fail("the process umask was changed"))
    atomic.atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"a": torch.ones(2)}, tmp))
    assert any(".w.safetensors." in s for s in synced) and str(tmp_path) in synced
    mode = (tmp_path / "w.safetensors").stat().st_mode & 0o777
    probe = tmp_path / "probe"
    os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o666))
    assert mode == probe.stat().st_mode & 0o777, "a plain file's mode (0666 less the umask), not 0600"


# -- non-finite -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("lr", ["inf", "1e10", "nan", "-1"])
def test_an_unusable_learning_rate_is_refused(ws, tmp_path, lr):  # noqa: F811
    with pytest.raises(AdapterError, match="train.lr must be a finite number in"):
        load_recipe(recipe_file(ws, tmp_path / "lr"), [f"train.lr={lr}"])


def test_nan_weights_stop_training_before_a_checkpoint_is_committed(ws, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "nanw"
    recipe = load_recipe(recipe_file(ws, out, train={"max_steps": 4, "max_grad_norm": None},
                                     output={"save_every": 1, "keep_last": 0}))
    real_step, calls = torch.optim.AdamW.step, []

    def step(self, *args, **kwargs):  # the third optimizer step leaves a NaN in the weights
        result = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            self.param_groups[0]["params"][0].data.view(-1)[0] = float("nan")
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(NonFiniteLoss, match=r"updated weights hold NaN/inf .* at step 3 .*last good checkpoint is "
                                            r".*step-00000002"):
        train(recipe)
    assert [s for s, _ in ckpt.checkpoints(out)] == [1, 2]
    for _, directory in ckpt.checkpoints(out):
        assert all(torch.isfinite(t).all() for t in load_file(directory / "adapter_model.safetensors").values())


def test_adapters_with_nan_are_neither_saved_nor_loaded(tmp_path):
    model, processor = build_tiny("llava")
    wrapped = va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor)
    wrapped.save_adapters(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = float("inf")
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=f"holds NaN/inf weights \\({name}"):
        va.load_adapters(wrapped.unwrap(), tmp_path, processor=processor)
    broken = va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor)
    with torch.no_grad():
        next(broken.adapters.parameters()).fill_(float("nan"))
    with pytest.raises(AdapterError, match="not saving adapters with NaN/inf weights"):
        broken.save_adapters(tmp_path / "new")
    assert not (tmp_path / "new").exists()


# -- adapter files --------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"adapters": "tgfom"}, "'adapters' must be a list of adapter configs"),
    ({"adapters": [{"method": "tgfom", "hidden_size": "abc"}]}, "hidden_size='abc' is not an integer"),
    ({"adapters": [{"method": "tgfom", "text": {"max_length": "x"}}]}, "max_length='x' is not an integer"),
    ({"adapters": [7]}, "adapters\\[0\\] must be an object"),
    ({"fingerprint": None}, "'fingerprint' must be an object"),
])
def test_a_wrongly_typed_adapter_config_is_a_clear_error(tmp_path, change, message):
    model, processor = build_tiny("llava")
    wrapped = va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor)
    wrapped.save_adapters(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(AdapterError, match=message):
        va.load_adapters(wrapped.unwrap(), tmp_path, processor=processor)


def test_save_adapters_after_unwrap_says_what_to_do(tmp_path):
    model, processor = build_tiny("llava")
    wrapped = va.wrap(model, va.TGFOMConfig(**SMALL), processor=processor)
    wrapped.unwrap()
    with pytest.raises(AdapterError, match="save the adapters before unwrap"):
        wrapped.save_adapters(tmp_path / "a")
    assert not list(tmp_path.iterdir())


# -- resume -----------------------------------------------------------------------------------------------
def test_resume_skips_a_damaged_newest_checkpoint_and_says_so(ws, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "dmg"
    recipe = load_recipe(recipe_file(ws, out, train={"max_steps": 3}, output={"save_every": 1, "keep_last": 0}))
    train(recipe, stop_after=2)
    newest = ckpt.latest_checkpoint(out)
    data = (newest / "rank-0.safetensors").read_bytes()
    (newest / "rank-0.safetensors").write_bytes(data[: len(data) // 2])  # cut short
    result = train(recipe, resume=True)
    assert result.step == 3
    err = capsys.readouterr().err
    assert "step-00000002 is damaged (rank-0.safetensors is unreadable" in err
    assert "resuming from step-00000001, the newest intact checkpoint" in err
    assert (out / "checkpoints" / "damaged-step-00000002").is_dir()
    assert [s for s, _ in ckpt.checkpoints(out)] == [1, 2, 3]


def test_resume_with_a_changed_lr_trains_and_records_the_new_lr(ws, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "lr"
    path = recipe_file(ws, out, train={"max_steps": 4, "schedule": "constant", "warmup_ratio": 0.0})
    train(load_recipe(path), stop_after=2)
    result = train(load_recipe(path, ["train.lr=1e-5", "train.weight_decay=0.1"]), resume=True)
    assert "train.lr 0.001 -> 1e-05" in capsys.readouterr().err
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["recipe"]["train"]["lr"] == 1e-5
    groups = ckpt.read_rank_state(result.checkpoint, 0)["optimizer"]["param_groups"]
    assert all(g["lr"] == 1e-5 for g in groups) and groups[0]["weight_decay"] == 0.1
    with pytest.raises(AdapterError, match="it was written by another recipe \\(train.optimizer was 'adamw', now 'sgd'\\)"):
        train(load_recipe(path, ["train.optimizer=sgd", "train.max_steps=6"]), resume=True)


def test_disk_full_while_checkpointing_keeps_the_last_checkpoint(ws, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "full"
    recipe = load_recipe(recipe_file(ws, out, train={"max_steps": 4}, output={"save_every": 1, "keep_last": 1}))
    real, calls = ckpt.save_file, []

    def save_file_disk_full(tensors, path, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint's optimizer state
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file_disk_full)
    with pytest.raises(AdapterError, match=r"could not write the checkpoint of step 2 \(No space left on device\).*"
                                           r"step-00000001\) is kept.*keep_last N needs room for N\+1"):
        train(recipe)
    assert [s for s, _ in ckpt.checkpoints(out)] == [1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001"], "no stray temp directory"
    assert ckpt.damage(ckpt.latest_checkpoint(out)) is None
