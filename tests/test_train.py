"""Adapter-only training end to end: a tiny LLaVA saved with save_pretrained, a generated dataset of
PNGs + LLaVA-format JSON, the `vlm-adapters` commands and the `vlm_adapters.train` API."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import click
import pytest
import torch
import typer
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from typer.testing import CliRunner

from vlm_adapters.cli.main import app
from vlm_adapters.errors import AdapterError
from vlm_adapters.integrations import get_shim
from vlm_adapters.tiny import FAMILIES, build_tiny
from vlm_adapters.train import NonFiniteLoss, TrainingInterrupted, load_base, load_recipe, load_trained, train
from vlm_adapters.train import checkpoint as ckpt
from vlm_adapters.train.data import Collator, parse_record, read_records
from vlm_adapters.train.model import trainable_parameters
from vlm_adapters.train.recipe import read_recipe_yaml, shipped_recipes

from .conftest import save_tiny

runner = CliRunner()
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange", "pink"]
QUESTION = "What colour is the square?"


def record(i: int, colour: str, image: str | None = None, **extra) -> dict:
    return {"id": f"r{i}", "image": image or f"{i}.png", "conversations": [
        {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": f"The square is {colour}."}],
        **extra}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """model/ (tiny LLaVA + processor), images/0..8.png, data.json (9 records)."""
    root = tmp_path_factory.mktemp("train")
    model, processor = save_tiny(root / "model")
    (root / "images").mkdir()
    for i, colour in enumerate(COLOURS):
        img = Image.new("RGB", (64, 48), "grey")
        ImageDraw.Draw(img).rectangle((8, 8, 30, 30), fill=colour)
        img.save(root / "images" / f"{i}.png")
    (root / "data.json").write_text(json.dumps([record(i, c) for i, c in enumerate(COLOURS)]))
    return root


def recipe_file(ws: Path, out: Path, name: str = "recipe", **sections) -> Path:
    data = {
        "model": {"name_or_path": str(ws / "model")},
        "adapters": [{"method": "tgfom", "hidden_size": 32, "num_heads": 2}],
        "data": {"json": str(ws / "data.json"), "image_root": str(ws / "images")},
        "train": {"lr": "1e-3", "batch_size": 2, "grad_accum": 2, "max_steps": 4, "schedule": "cosine",
                  "warmup_ratio": 0.1},
        "output": {"dir": str(out), "save_every": 2, "log_every": 2},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = out.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def state_digest(module: torch.nn.Module) -> str:
    return ckpt.weights_digest(sorted(module.state_dict().items()))


def tensors_equal(a: Path, b: Path) -> bool:
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# -- the commands end to end -----------------------------------------------------------------------
def test_tgdp_trains_and_answers_on_the_original_images(ws, tmp_path):
    """TG-DP cuts its tiles from the originals: the collator gives them, so neither training nor infer
    falls back to the upscaled processed image (which warns)."""
    out = tmp_path / "run"
    recipe = recipe_file(ws, out, adapters=[{"method": "tgdp", "hidden_size": 32, "num_heads": 2, "num_latents": 4}])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        result = runner.invoke(app, ["train", str(recipe)])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["infer", "--adapters", str(out), "--image", str(ws / "images" / "0.png"),
                                     "--question", QUESTION, "--max-new-tokens", "3"])
        assert result.exit_code == 0, result.output
    model, processor = build_tiny("llava")
    rec = parse_record({"id": "a", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nHi?"},
                                                                      {"from": "gpt", "value": "Yes."}]}, "a", Path("."))
    img = Image.new("RGB", (64, 48), "grey")
    shim = get_shim(model)
    assert "images" not in Collator(processor, shim.image_token_id)([(rec, img)])
    assert Collator(processor, shim.image_token_id, with_images=True)([(rec, img)])["images"] == [img]


def test_train_writes_checkpoints_infer_answers_inspect_shows_them(ws, tmp_path):
    base_files = {p.name: sha256(p) for p in (ws / "model").iterdir()}
    out = tmp_path / "run"
    recipe = recipe_file(ws, out)
    result = runner.invoke(app, ["train", str(recipe), "--set", "output.keep_last=2"])
    assert result.exit_code == 0, result.output
    assert "loss" in result.output and "samples/s" in result.output
    assert [s for s, _ in ckpt.checkpoints(out)] == [2, 4]
    latest = ckpt.latest_checkpoint(out)
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "rank-0.json",
                 "rank-0.safetensors"):
        assert (latest / name).is_file(), name
    assert not list((out / "checkpoints").glob(".*tmp")), "no staging directory is left behind"
    record = json.loads((latest / "trainer_state.json").read_text())["provenance"]  # the recipe is beside it
    assert record["base_model"]["name_or_path"] == str(ws / "model") and record["base_model"]["dtype"] == "float32"
    assert json.loads((latest / "adapter_config.json").read_text())["base_model"] == record["base_model"] | {
        "relative_path": os.path.relpath(ws / "model", latest)}
    assert {p.name: sha256(p) for p in (ws / "model").iterdir()} == base_files

    result = runner.invoke(app, ["infer", "--adapters", str(out), "--image", str(ws / "images" / "0.png"),
                                 "--question", QUESTION, "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert f"[adapters {latest}]" in result.output and result.output.strip().splitlines()[-1].strip()
    base = runner.invoke(app, ["infer", "--model", str(ws / "model"), "--image", str(ws / "images" / "0.png"),
                               "--question", QUESTION, "--max-new-tokens", "6"])
    assert base.exit_code == 0 and "[base model]" in base.output, base.output

    info = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).output)
    weights = load_file(latest / "adapter_model.safetensors")
    assert info["directory"] == str(latest) and info["training"]["step"] == 4
    assert [a["method"] for a in info["adapters"]] == ["tgfom"]
    assert info["adapters"][0]["tensors"] == len(weights)
    assert info["adapters"][0]["parameters"] == sum(t.numel() for t in weights.values())
    assert info["adapters"][0]["config"]["hidden_size"] == 32
    assert info["base_model"]["name_or_path"] == str(ws / "model") and info["fingerprint"]["family"] == "llava"
    shown = runner.invoke(app, ["inspect", str(latest)], env={"COLUMNS": "200"})
    assert shown.exit_code == 0 and "tgfom" in shown.output and "base fingerprint" in shown.output

    again = runner.invoke(app, ["train", str(recipe)])
    assert again.exit_code == 2 and "--resume" in again.output


def test_resume_is_bit_identical_and_the_base_stays_frozen(ws, tmp_path):
    # 9 records, batch 2 -> 5 micro-batches per epoch, accumulation 2 -> 3 steps per epoch (the last
    # one of a single micro-batch); 10 steps cross three epoch ends, the pause at 5 falls mid-epoch.
    straight = recipe_file(ws, tmp_path / "a", "a", train={"max_steps": 10}, output={"save_every": 100})
    paused = recipe_file(ws, tmp_path / "b", "b", train={"max_steps": 10}, output={"save_every": 100})
    a = train(load_recipe(straight))
    b1 = train(load_recipe(paused), stop_after=5)
    assert b1.status == "paused" and [s for s, _ in ckpt.checkpoints(tmp_path / "b")] == [5]
    b2 = train(load_recipe(paused), resume=True)
    assert a.status == b2.status == "completed" and a.step == b2.step == 10
    assert b1.losses + b2.losses == a.losses
    for name in ("adapter_model.safetensors", "rank-0.safetensors"):  # weights, optimizer and RNG states
        assert tensors_equal(a.checkpoint / name, b2.checkpoint / name), name

    fresh, _ = load_base(str(ws / "model"))
    trained_base = a.model.base_model
    assert state_digest(trained_base) == state_digest(fresh), "the base's weights changed"
    assert all(p.grad is None and not p.requires_grad for p in trained_base.parameters())
    rank = json.loads((a.checkpoint / "rank-0.json").read_text())
    assert rank["params"] and all(n.startswith("adapters.") for n in rank["params"])
    assert len(rank["optimizer"]["state"]["__dict__"]) == len(rank["params"])


def test_two_processes_end_with_identical_adapters(ws, tmp_path):
    out = tmp_path / "ddp"
    recipe = recipe_file(ws, out, train={"max_steps": 3}, output={"save_every": 3})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vlm_adapters.cli.main", "train", str(recipe), "--cpu"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 processes (DDP on CPUs)" in done.stderr
    latest = ckpt.latest_checkpoint(out)
    digests = [json.loads((latest / f"rank-{r}.json").read_text())["trainable_sha256"] for r in (0, 1)]
    assert digests[0] == digests[1]
    model, processor = load_base(str(ws / "model"))
    saved = load_trained(model, latest, processor)
    assert ckpt.weights_digest(trainable_parameters(saved)) == digests[0]


def test_lora_and_projector_train_save_and_reload(ws, tmp_path):
    out = tmp_path / "lora"
    recipe = recipe_file(ws, out, trainable={"projector": True, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
                         train={"max_steps": 2, "lr": 1e-2})
    result = train(load_recipe(recipe))
    names = [n for n, _ in trainable_parameters(result.model)]
    assert any(n.startswith("projector.") for n in names) and any("lora_" in n for n in names)
    assert (result.checkpoint / "projector.safetensors").is_file()
    assert (result.checkpoint / "lora" / "adapter_model.safetensors").is_file()

    model, processor = load_base(str(ws / "model"))
    reloaded = load_trained(model, result.checkpoint, processor)
    trained = result.model.eval()
    inputs = processor(images=[Image.open(ws / "images" / "1.png")], text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True)], return_tensors="pt")
    with torch.no_grad():
        expected = trained(**inputs, guidance_text=[QUESTION]).logits
        torch.testing.assert_close(reloaded(**inputs, guidance_text=[QUESTION]).logits, expected, rtol=0, atol=1e-6)
    info = json.loads(runner.invoke(app, ["inspect", str(out), "--json"]).output)
    assert info["projector"]["tensors"] == 4 and info["lora"]["r"] == 4 and info["lora"]["tensors"] > 0


# -- stopping ---------------------------------------------------------------------------------------
def _patched_collate(monkeypatch, on_call: dict):
    """Run on_call[n](batch) on the n-th batch the collator builds."""
    original, calls = Collator.__call__, []

    def collate(self, items):
        batch = original(self, items)
        calls.append(1)
        if len(calls) in on_call:
            on_call[len(calls)](batch)
        return batch

    monkeypatch.setattr(Collator, "__call__", collate)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(ws, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    recipe = load_recipe(recipe_file(ws, out, train={"max_steps": 6}, output={"save_every": 1, "keep_last": 0}))
    _patched_collate(monkeypatch, {5: lambda batch: batch["pixel_values"].fill_(float("nan"))})
    with pytest.raises(NonFiniteLoss, match=r"the loss is \[nan\] at step 3 .*records \[.*last good checkpoint is "
                                            r".*step-00000002"):
        train(recipe)
    assert [s for s, _ in ckpt.checkpoints(out)] == [1, 2]
    assert not list((out / "checkpoints").glob(".*tmp"))


@pytest.fixture
def sigint_default():
    """Ctrl-C as an interactive shell delivers it: a pytest started with SIGINT ignored (nohup, a
    background job, some CI runners) hands the ignore down, and the trainer keeps the caller's handler."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_saves_a_checkpoint_then_stops_and_resume_finishes(ws, tmp_path, monkeypatch, sigint_default):
    out = tmp_path / "sigint"
    recipe = load_recipe(recipe_file(ws, out, train={"max_steps": 5}, output={"save_every": 100}))
    _patched_collate(monkeypatch, {2: lambda batch: signal.raise_signal(signal.SIGINT)})
    with pytest.raises(TrainingInterrupted) as stop:
        train(recipe)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert stop.value.checkpoint == ckpt.latest_checkpoint(out) and 1 <= stop.value.step < 5
    state = json.loads((stop.value.checkpoint / "trainer_state.json").read_text())
    assert state["step"] == stop.value.step
    monkeypatch.undo()
    assert train(recipe, resume=True).step == 5


# -- recipes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_validates(name):
    _, raw = read_recipe_yaml(name)
    recipe = load_recipe(name, check_adapters=False)  # every section but the adapters' own keys
    assert recipe.description and recipe.output.dir
    pending = recipe.pending_methods()
    if pending:
        pytest.skip(f"method(s) {pending} not registered yet; this recipe's adapters are checked once they are")
    load_recipe(name)
    assert [a["method"] for a in recipe.to_dict()["adapters"]] == [a["method"] for a in raw["adapters"]]


def test_tg_llava_recipes_follow_the_paper():
    stage1, stage2 = load_recipe("tg-llava-1.5-7b-stage1", check_adapters=False), \
        load_recipe("tg-llava-1.5-7b-stage2", check_adapters=False)
    assert (stage1.train.lr, stage1.train.global_batch_size) == (1e-3, 256)
    assert (stage2.train.lr, stage2.train.global_batch_size) == (2e-5, 128)
    assert stage1.grad_accum_for(1) == 8 and stage2.grad_accum_for(8) == 1
    assert stage2.model.init_from == stage1.output.dir
    assert {a["method"] for a in stage1.adapters} == {"tgfom", "tgdp"}


def test_recipes_list_and_show():
    listed = runner.invoke(app, ["recipes", "list"], env={"COLUMNS": "250"})
    assert listed.exit_code == 0 and all(name in listed.output for name in shipped_recipes())
    shown = runner.invoke(app, ["recipes", "show", "tg-llava-1.5-7b-stage1"])
    assert shown.exit_code == 0 and "lr: 1.0e-3" in shown.output and "# TG-LLaVA" in shown.output


@pytest.mark.parametrize("sets, hint", [
    (["train.lrr=1e-4"], "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    (["trian.lr=1e-4"], "unknown key 'trian'; did you mean 'train'?"),
    (["adapters.0.hiden_size=64"], "unknown key 'hiden_size' in tgfom config; did you mean 'hidden_size'?"),
    (["train.schedule=cosin"], "train.schedule='cosin' (did you mean 'cosine'?)"),
    (["adapters.3.hidden_size=64"], "adapters is a list of 1; use an index 0..0"),
    (["train.lr"], "use --set key=value"),
])
def test_a_typo_is_caught_with_a_suggestion(ws, tmp_path, sets, hint):
    recipe = recipe_file(ws, tmp_path / "typo")
    result = runner.invoke(app, ["train", str(recipe), *[arg for s in sets for arg in ("--set", s)]])
    assert result.exit_code == 2 and hint in result.output, result.output


def test_a_typo_in_the_yaml_is_caught_with_a_suggestion(ws, tmp_path):
    recipe = recipe_file(ws, tmp_path / "typo", output={"save_evry": 5})
    with pytest.raises(AdapterError, match="unknown key 'output.save_evry'; did you mean 'output.save_every'"):
        load_recipe(recipe)


def test_overrides_are_typed(ws, tmp_path):
    recipe = load_recipe(recipe_file(ws, tmp_path / "o"), [
        "train.lr=1e-4", "adapters.0.hidden_size=64", "trainable.lora={r: 4}", "train.betas=[0.9, 0.95]",
        "train.max_grad_norm=null", "train.global_batch_size=8", "train.grad_accum=null"])
    assert recipe.train.lr == 1e-4 and isinstance(recipe.train.lr, float)
    assert recipe.adapter_configs()[0].hidden_size == 64
    assert recipe.trainable.lora.r == 4 and recipe.trainable.lora.alpha == 32
    assert recipe.train.betas == [0.9, 0.95] and recipe.train.max_grad_norm is None
    assert recipe.grad_accum_for(2) == 2
    with pytest.raises(AdapterError, match="not a multiple"):
        recipe.grad_accum_for(3)


# -- data -------------------------------------------------------------------------------------------
def test_bad_records_are_reported_with_their_ids(ws, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    good = [record(i, c, image=str(ws / "images" / f"{i}.png")) for i, c in enumerate(COLOURS[:3])]
    bad = [
        {**record(10, "red", image=str(tmp_path / "nowhere.png")), "id": "missing"},
        {**record(11, "red", image=str(tmp_path / "broken.png")), "id": "unreadable"},
        {"id": "no-image-tag", "image": str(ws / "images" / "0.png"),
         "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": "Red."}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "gpt-first", "image": str(ws / "images" / "0.png"),
         "conversations": [{"from": "gpt", "value": "<image>\nRed."}]},
    ]
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(good[:2] + bad + good[2:]))
    ids = {"missing", "unreadable", "no-image-tag", "text-only", "gpt-first"}

    kept, reported = read_records(data, tmp_path, allow_outside_root=True)
    assert [r.id for r in kept] == ["r0", "r1", "r2"] and {b.id for b in reported} == ids

    out = tmp_path / "bad"
    recipe = recipe_file(ws, out, data={"json": str(data), "image_root": str(tmp_path), "on_bad_record": "error",
                                        "allow_outside_root": True})
    fatal = runner.invoke(app, ["train", str(recipe)])
    assert fatal.exit_code == 2 and "5 bad record(s)" in fatal.output and all(i in fatal.output for i in ids)
    assert not out.exists()

    skipped = runner.invoke(app, ["train", str(recipe), "--set", "data.on_bad_record=skip",
                                  "--set", "train.max_steps=1"])
    assert skipped.exit_code == 0, skipped.output
    assert "skipped 5 bad record(s)" in skipped.output and all(i in skipped.output for i in ids)
    assert {b["id"] for b in json.loads((out / "bad_records.json").read_text())} == ids


@pytest.mark.parametrize("family", FAMILIES)
def test_labels_mask_everything_but_the_answers(family):
    model, processor = build_tiny(family)
    answers = ["The square is red.", "It is on the left."]
    item = {"id": "multi", "image": "x.png", "conversations": [
        {"from": "human", "value": f"{QUESTION}\n<image>"}, {"from": "gpt", "value": answers[0]},
        {"from": "human", "value": "Where is it?"}, {"from": "gpt", "value": answers[1]}]}
    rec = parse_record(item, "multi", Path("."))
    img = Image.new("RGB", (64, 48), "grey")
    batch = Collator(processor, get_shim(model).image_token_id)([(rec, img), (rec, img.resize((40, 70)))])
    assert batch["guidance_text"] == [QUESTION, QUESTION] and batch["ids"] == ["multi", "multi"]
    for row in range(2):
        labels = batch["labels"][row]
        learnt = processor.tokenizer.decode(labels[labels != -100], skip_special_tokens=True)
        assert answers[0] in learnt and answers[1] in learnt
        assert QUESTION not in learnt and "Where is it?" not in learnt
        assert (labels[batch["attention_mask"][row] == 0] == -100).all()
        image_token = processor.image_token_id
        assert (labels[batch["input_ids"][row] == image_token] == -100).all()


# -- the CLI's help -----------------------------------------------------------------------------------
def test_every_option_has_help():
    def walk(command: click.Command, path: str):
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    for path, command in walk(typer.main.get_command(app), "vlm-adapters"):
        if path.split()[1:2] and path.split()[1] in ("train", "infer", "inspect", "recipes"):
            assert command.help, f"{path} has no help"
            for param in command.params:
                assert getattr(param, "help", None), f"{path} {param.name} has no help"


def test_the_process_count_reads_as_words():
    from types import SimpleNamespace

    from vlm_adapters.train.loop import processes

    def acc(n, kind):
        return SimpleNamespace(num_processes=n, distributed_type=SimpleNamespace(value=kind))

    assert processes(acc(1, "NO")) == "1 process"
    assert processes(acc(2, "MULTI_CPU")) == "2 processes (DDP on CPUs)"
    assert processes(acc(8, "XLA")) == "8 processes (XLA)"
