"""SemClip at dataset scale and training beyond one process: the oracle's shared prefix, sharded labels,
the shipped scorer recipe end to end (one process and two), the FSDP/DeepSpeed configs, and gradient
checkpointing with adapters in the vision path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from typer.testing import CliRunner

import vlm_adapters as va
from vlm_adapters.cli.main import app
from vlm_adapters.errors import AdapterError
from vlm_adapters.eval.load import load as eval_load
from vlm_adapters.eval.load import plan as eval_plan
from vlm_adapters.semclip.labels import label_dataset, merge_labels, read_labels
from vlm_adapters.semclip.oracle import oracle, shares_prefix
from vlm_adapters.tiny import build_tiny
from vlm_adapters.train import checkpoint as ckpt
from vlm_adapters.train import load_recipe, train
from vlm_adapters.train.model import build_trainable, trainable_parameters

from .conftest import make_image, save_tiny

ARCH = "ViT-S-32-alt"  # a small open_clip: crops dominate these tests
RECIPE = "semclip-scorer-llava-1.5-7b"
ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def semclip(family: str):
    model, processor = build_tiny(family)
    return va.wrap(model, va.SemClipConfig(scorer_arch=ARCH, min_crop_size=8), processor=processor).eval()


# -- the oracle's shared prefix ----------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "llava_next", "perception_lm"])
def test_the_shared_prefix_scores_every_crop_as_the_wrapper_does(family):
    wrapped = semclip(family)
    assert shares_prefix(wrapped)
    image = make_image(96, 64)
    one_by_one = oracle(wrapped, image, "What colour is the square?", "red", batch_size=1, share_prefix=False)
    shared = oracle(wrapped, image, "What colour is the square?", "red", batch_size=5)
    assert len(shared.boxes) == 13 and shared.boxes == one_by_one.boxes
    torch.testing.assert_close(torch.tensor(shared.loglik), torch.tensor(one_by_one.loglik), atol=1e-4, rtol=0)
    assert shared.best == one_by_one.best
    assert len(set(shared.loglik)) > 1  # the crops do change the answer's likelihood


def test_qwen_goes_through_the_wrapper_and_a_bad_batch_size_is_refused():
    wrapped = semclip("qwen2_vl")
    assert not shares_prefix(wrapped)  # its 3D positions move with the crop
    assert len(oracle(wrapped, make_image(96, 64), "What colour?", "red").loglik) == 13
    with pytest.raises(AdapterError, match="batch_size=0"):
        oracle(wrapped, make_image(), "What colour?", "red", batch_size=0)


# -- a tiny dataset and the shipped recipe on it --------------------------------------------------------
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale")
    save_tiny(root / "model")
    (root / "images").mkdir()
    records = []
    for i, colour in enumerate(COLOURS):
        image = Image.new("RGB", (96, 64), "white")
        ImageDraw.Draw(image).rectangle((8 + 10 * i, 8, 40 + 10 * i, 40), fill=colour)
        image.save(root / "images" / f"{i}.png")
        records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": colour}]})
    records.append({"id": "missing", "image": "nowhere.png", "conversations": records[0]["conversations"]})
    (root / "data.json").write_text(json.dumps(records))
    return root


def overrides(ws: Path, out: Path) -> list[str]:
    """The shipped scorer recipe pointed at the tiny model and data (what a test can afford)."""
    sets = {"model.name_or_path": ws / "model", "data.json": ws / "data.json", "data.image_root": ws / "images",
            "output.dir": out, "adapters.0.scorer_arch": ARCH, "adapters.0.min_crop_size": 8,
            "train.precision": "fp32", "train.batch_size": 2, "train.epochs": 2, "train.lr": 0.01,
            "train.warmup_ratio": 0.0, "output.save_every": 2, "output.log_every": 1}
    return [item for key, value in sets.items() for item in ("--set", f"{key}={value}")]


@pytest.fixture(scope="module")
def one_process(ws, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "psi"
    result = runner.invoke(app, ["train", RECIPE, *overrides(ws, out)])
    assert result.exit_code == 0, result.output
    return out


def test_the_shipped_scorer_recipe_labels_then_trains_psi(ws, one_process):
    out = one_process
    labels = read_labels(out / "labels.jsonl")
    assert [x["id"] for x in labels] == [f"r{i}" for i in range(len(COLOURS))]  # the bad record is left out
    assert all(x["best"] == max(range(13), key=x["loglik"].__getitem__) for x in labels)
    assert json.loads((out / "bad_records.json").read_text())[0]["id"] == "missing"
    assert [s for s, _ in ckpt.checkpoints(out)] == [4, 6]  # 6 questions / batch 2 = 3 steps an epoch
    latest = ckpt.latest_checkpoint(out)
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["recipe"]["task"] == "semclip_scorer" and state["step"] == 6
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(map(lambda v: v == v, losses))

    # the output is an adapter directory: load_adapters, and the eval path with semclip settings
    model, processor = build_tiny("llava")
    fresh = va.wrap(model, va.SemClipConfig(scorer_arch=ARCH, min_crop_size=8), processor=processor)
    initial = {k: v.clone() for k, v in fresh.adapters["semclip"].scorer.state_dict().items() if "head" in k}
    fresh.unwrap()
    loaded = va.load_adapters(build_tiny("llava")[0], latest, processor=processor)
    heads = {k: v for k, v in loaded.adapters["semclip"].scorer.state_dict().items() if "head" in k}
    assert heads and any(not torch.equal(heads[k], initial[k]) for k in heads)  # psi trained
    evaluated, _ = eval_load(eval_plan(None, adapters=str(out), semclip='{"top_k": 2}'))
    assert evaluated.adapters["semclip"].config.top_k == 2
    saved = load_file(latest / "adapter_model.safetensors")
    assert all(torch.equal(saved[f"semclip.scorer.{k}"], v.to(saved[f"semclip.scorer.{k}"].dtype))
               for k, v in evaluated.adapters["semclip"].scorer.state_dict().items() if "head" in k)


def test_the_scorer_recipe_resumes_and_a_rerun_continues_the_labels(ws, one_process, tmp_path):
    out = tmp_path / "psi"
    out.mkdir()
    lines = (one_process / "labels.jsonl").read_text().splitlines(keepends=True)
    (out / "labels.jsonl").write_text("".join(lines[:2]) + lines[2][:40])  # killed while labelling
    paused = runner.invoke(app, ["train", RECIPE, *overrides(ws, out), "--stop-after", "2"])
    assert paused.exit_code == 0, paused.output
    assert "4 written by process 0" in paused.output and "2 already in" in paused.output
    assert (out / "labels.jsonl").read_text() == "".join(lines)
    resumed = runner.invoke(app, ["train", RECIPE, *overrides(ws, out), "--resume"])
    assert resumed.exit_code == 0, resumed.output and "resuming from" in resumed.output
    for name in ("adapter_model.safetensors", "rank-0.safetensors"):  # as if it never stopped
        a, b = load_file(ckpt.latest_checkpoint(out) / name), load_file(ckpt.latest_checkpoint(one_process) / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def torchrun(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vlm_adapters.cli.main", *args]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True,
                          text=True, timeout=300)


def test_two_processes_label_the_same_file_and_train_the_same_psi(ws, one_process, tmp_path):
    out = tmp_path / "psi"
    done = torchrun("train", RECIPE, *overrides(ws, out), "--set", "train.batch_size=1", "--cpu")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 processes (DDP on CPUs)" in done.stderr
    assert "3 written by process 0 (2 processes (DDP on CPUs))" in done.stderr
    assert (out / "labels.jsonl").read_text() == (one_process / "labels.jsonl").read_text()
    assert not list(out.glob("labels.jsonl.shard-*"))
    latest = ckpt.latest_checkpoint(out)
    digests = [json.loads((latest / f"rank-{r}.json").read_text())["trainable_sha256"] for r in (0, 1)]
    assert digests[0] == digests[1]


def test_shards_labelled_side_by_side_merge_into_the_one_process_file(ws, one_process, tmp_path):
    """Two shards in two threads (a threading barrier for the processes'): one split of the pending
    records for both, each its own shard file, merged into the one-process file."""
    import threading

    from vlm_adapters.semclip.labels import Shard

    wrapped, out = semclip("llava"), tmp_path / "labels.jsonl"
    barrier, reports = threading.Barrier(2), {}

    def run(rank: int) -> None:
        reports[rank] = label_dataset(wrapped, ws / "data.json", ws / "images", out, shard=Shard(rank, 2, barrier.wait))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert reports[0].written + reports[1].written == len(COLOURS) and reports[0].written == 3
    assert reports[0].total == len(COLOURS) and [b.id for b in reports[0].bad] == ["missing"] and not reports[1].bad
    assert out.read_text() == (one_process / "labels.jsonl").read_text() and not list(tmp_path.glob("*.shard-*"))


def test_ctrl_c_while_labelling_keeps_the_labels_and_says_how_to_continue(ws, tmp_path, monkeypatch):
    import vlm_adapters.semclip.task as task

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(task, "label_dataset", interrupted)
    out = tmp_path / "psi"
    result = runner.invoke(app, ["train", RECIPE, *overrides(ws, out)])
    assert result.exit_code == 2 and "interrupted while labelling" in result.output
    assert "run the same command again to continue" in result.output and not (out / "checkpoints").exists()


def test_interrupted_shards_merge_in_record_order(ws, one_process, tmp_path):
    """What a killed two-process run leaves (each process's shard, one cut mid-line) is kept and
    merged by the next run, into the file one process writes."""
    lines = (one_process / "labels.jsonl").read_text().splitlines(keepends=True)
    out = tmp_path / "labels.jsonl"
    Path(f"{out}.shard-0").write_text(lines[4] + lines[0])
    Path(f"{out}.shard-1").write_text(lines[1] + lines[5][:30])
    wrapped = semclip("llava")
    report = label_dataset(wrapped, ws / "data.json", ws / "images", out)
    assert report.written == 3 and report.already_done == 3 and [b.id for b in report.bad] == ["missing"]
    assert out.read_text() == "".join(lines) and not list(tmp_path.glob("*.shard-*"))
    merge_labels(out, ["r5", "r4"])  # another order: those ids first, the rest as found
    assert [x["id"] for x in read_labels(out)][:3] == ["r5", "r4", "r0"]


# -- FSDP, DeepSpeed and gradient checkpointing ----------------------------------------------------------
def test_accelerate_configs_are_shipped_and_valid():
    from accelerate.commands.config.config_args import load_config_from_file

    from vlm_adapters.train.recipe import accelerate_configs

    configs = accelerate_configs()
    kinds = {name: load_config_from_file(str(path)).distributed_type.value for name, path in configs.items()}
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed-zero2": "DEEPSPEED", "deepspeed-zero3": "DEEPSPEED"}
    stages = {name: yaml.safe_load(configs[name].read_text())["deepspeed_config"]["zero_stage"]
              for name in ("deepspeed-zero2", "deepspeed-zero3")}
    assert stages == {"deepspeed-zero2": 2, "deepspeed-zero3": 3}
    assert yaml.safe_load(configs["fsdp"].read_text())["fsdp_config"]["fsdp_version"] == 2
    shown = runner.invoke(app, ["recipes", "accelerate", "fsdp"])
    assert shown.exit_code == 0 and shown.output.strip() == str(configs["fsdp"])
    wrong = runner.invoke(app, ["recipes", "accelerate", "zero9"])
    assert wrong.exit_code == 2 and "shipped: ddp, deepspeed-zero2, deepspeed-zero3, fsdp" in wrong.output


def test_fsdp_on_cpus_is_refused_with_the_reason(ws, tmp_path, monkeypatch):
    """accelerate 1.16 turns FSDP (and DeepSpeed) on for GPU processes only: asked for on CPUs it would
    silently train as DDP (MULTI_CPU) or one process; the run stops and says so instead."""
    recipe = load_recipe(RECIPE, overrides(ws, tmp_path / "out")[1::2])
    recipe.task, recipe.adapters = "adapters", [{"method": "tgfom", "hidden_size": 32, "num_heads": 2}]
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(AdapterError, match="FSDP was asked for .* as NO: accelerate turns FSDP on only for GPU"):
        train(recipe, cpu=True)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # not installed here (and it needs CUDA)
    with pytest.raises(AdapterError, match="DeepSpeed (is not installed|was asked for)"):
        train(recipe, cpu=True)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_fsdp2_over_two_cpu_processes_trains_the_adapters_of_one_process(tmp_path):
    """torch's FSDP2 runs on CPUs over gloo: the wrapped base and its adapters sharded over 2 processes
    (DTensor parameters), 3 SGD steps with the optimizer state written shard by shard with the training
    loop's rank-N files and resumed from them before the last step, then the full adapter tensors gathered
    and saved as the loop saves a sharded run; they equal a one-process run's. (Through `vlm-adapters
    train` FSDP is refused on CPUs: accelerate does not turn it on there, see the test above.)"""
    from tests.fsdp_worker import main, trainable

    main(str(tmp_path / "one"))  # one process, here
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "tests.fsdp_worker", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("sharded: DTensor") == 2
    a, b = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("one", "two"))
    initial = {k: v for k, v in trainable()[0].adapters.state_dict().items()}
    assert a.keys() == b.keys() == initial.keys()
    trained = [k for k in a if not torch.equal(a[k], initial[k])]
    assert "tgfom.latents" in trained and len(trained) > len(a) // 2, trained  # (a norm without gradient stays)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)
    loaded = va.load_adapters(build_tiny("llava")[0], tmp_path / "two", processor=build_tiny("llava")[1])
    assert loaded.adapters["tgfom"].latents.shape == a["tgfom.latents"].shape


def test_gradient_checkpointing_keeps_adapter_gradients_in_the_vision_path():
    """A frozen base under gradient checkpointing: TIE (inside the vision blocks) and TG-FOM (before the
    projector) still get the gradients they get without it."""
    from vlm_adapters.train.recipe import recipe_from_dict

    grads = {}
    for checkpointing in (False, True):
        model, processor = build_tiny("llava")
        recipe = recipe_from_dict({
            "model": {"name_or_path": "tiny"}, "data": {"json": "x.json"}, "output": {"dir": "x"},
            "adapters": [{"method": "tie", "num_heads": 2, "head_dim": 8},
                         {"method": "tgfom", "hidden_size": 32, "num_heads": 2}],
            "train": {"gradient_checkpointing": checkpointing}})
        torch.manual_seed(0)
        wrapped = build_trainable(model, processor, recipe).train()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}]
        inputs = processor(images=[make_image()], text=[processor.apply_chat_template(messages)], return_tensors="pt")
        with torch.no_grad():  # move off the zero inits (TIE's gates, TG-FOM's Z), which stop the gradients
            generator = torch.Generator().manual_seed(0)
            for _, p in trainable_parameters(wrapped):
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
        wrapped(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads[checkpointing] = {n: p.grad for n, p in trainable_parameters(wrapped)}
        assert model.is_activation_checkpointing == checkpointing
    assert any("tie" in n for n in grads[True]) and any("tgfom" in n for n in grads[True])
    for name, grad in grads[True].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads[False][name], atol=1e-5, rtol=1e-4)
