"""Reliability IV (issue 28): nothing lost through a set's name, a second run or a stale file, and a
one-line error for the next round of hostile inputs. Kills are injected with tests/faults.py."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner
from vlm_adapters.cli.main import app

import vlm_adapters as va
from vlm_adapters.semclip.labels import read_labels
from vlm_adapters.tiny import build_tiny
from vlm_adapters.train import checkpoint as ckpt
from vlm_adapters.train import load_recipe, train
from vlm_adapters.train import loop as loop_module
from vlm_adapters.train.model import build_trainable, load_trained
from vlm_adapters.train.recipe import recipe_from_dict
from vlm_adapters.train.run_dir import RunLock

from .faults import run_killed
from .test_train import recipe_file, ws  # noqa: F401  (ws: the shared training workspace)

runner = CliRunner()
SMALL = {"hidden_size": 32, "num_heads": 2}


def tgfom(hidden: int = 32):
    return va.TGFOMConfig(hidden_size=hidden, num_heads=2)


def saved_sets(root) -> dict:
    """{set name: hidden_size} of what a save_pretrained directory holds ("default" at the root)."""
    sets = {}
    for config in sorted(root.glob("**/adapter_config.json")):
        if config.parent.name == "lora":
            continue
        name = "default" if config.parent == root else config.parent.name
        sets[name] = json.loads(config.read_text())["adapters"][0]["hidden_size"]
    return sets


# -- data loss: a set's name, stale files, a kill between two sets ----------------------------------
@pytest.mark.parametrize("name", ["lora", "LoRA", "projector", "checkpoints", "adapter_model"])
def test_a_set_name_that_collides_with_the_library_files_is_refused(name):
    model, processor = build_tiny("llava")
    wrapped = va.wrap(model, tgfom(), processor=processor)
    with pytest.raises(va.AdapterError, match=rf"adapter_name='{name}' is reserved.*choose another name"):
        wrapped.add_adapter(name, tgfom())
    with pytest.raises(va.AdapterError, match="is reserved"):
        va.wrap(wrapped.unwrap(), tgfom(), processor=processor, adapter_name=name)


def test_a_set_saved_over_the_lora_by_an_older_version_is_named_by_load_and_inspect(tmp_path):
    model, processor = build_tiny("llava")
    recipe = recipe_from_dict({"model": {"name_or_path": "x"}, "adapters": [{"method": "tgfom", **SMALL}],
                               "trainable": {"lora": {"r": 2, "alpha": 4}}, "data": {"json": "d.json"},
                               "output": {"dir": "o"}})
    build_trainable(model, processor, recipe).save_pretrained(tmp_path / "run")
    other, _ = build_tiny("llava")
    va.wrap(other, tgfom(), processor=processor).save_adapters(tmp_path / "run" / "lora")  # what the old bug did
    with pytest.raises(va.AdapterError, match="lora/adapter_config.json is a vlm_adapters adapter set, not the LoRA"):
        load_trained(build_tiny("llava")[0], tmp_path / "run", processor)
    result = runner.invoke(app, ["inspect", str(tmp_path / "run")])
    assert result.exit_code == 2 and "a named set called 'lora' was saved over the LoRA" in result.output


def test_a_later_save_leaves_no_stale_projector_nor_removed_set(tmp_path):
    model, processor = build_tiny("llava")
    recipe = recipe_from_dict({"model": {"name_or_path": "x"}, "adapters": [{"method": "tgfom", **SMALL}],
                               "trainable": {"projector": True}, "data": {"json": "d.json"}, "output": {"dir": "o"}})
    first = build_trainable(model, processor, recipe)
    first.add_adapter("b", tgfom())
    first.save_pretrained(tmp_path)
    assert (tmp_path / "projector.safetensors").is_file() and (tmp_path / "b" / "projector.safetensors").is_file()
    (tmp_path / "NOTES.md").write_text("mine")
    (tmp_path / "b" / "NOTES.md").write_text("b's")
    first.unwrap()

    second = va.wrap(build_tiny("llava")[0], tgfom(16), processor=processor)  # no projector, no set b
    second.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["NOTES.md", "README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]
    reloaded = load_trained(build_tiny("llava")[0], tmp_path, processor)
    assert reloaded.configs[0].hidden_size == 16
    assert not any(p.requires_grad for p in reloaded.shim.projector().parameters())

    second.add_adapter("b", tgfom())
    second.save_pretrained(tmp_path)  # a set saved again keeps the user's file in its directory
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["README.md", "adapter_config.json",
                                                                    "adapter_model.safetensors"]
    (tmp_path / "b" / "NOTES.md").write_text("b's")
    second.save_pretrained(tmp_path)
    assert (tmp_path / "b" / "NOTES.md").read_text() == "b's" and (tmp_path / "NOTES.md").read_text() == "mine"
    va.wrap(build_tiny("llava")[0], tgfom(8), processor=processor).save_adapters(tmp_path / "backup")
    second.save_pretrained(tmp_path)  # an adapter directory of the user's own inside (set "default"): kept
    assert saved_sets(tmp_path / "backup") == {"default": 8}
    (tmp_path / "backup").rename(tmp_path.parent / f"{tmp_path.name}-backup")
    second.save_adapters(tmp_path)  # one set's directory: the named sets of an earlier save go too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["NOTES.md", "README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]


def test_a_kill_at_any_point_of_save_pretrained_leaves_the_old_directory_or_the_new_one(tmp_path):
    model, processor = build_tiny("llava")
    old = va.wrap(model, tgfom(32), processor=processor)
    old.add_adapter("b", tgfom(32))
    target = tmp_path / "adapters"
    old.save_pretrained(target)
    (target / "NOTES.md").write_text("mine")
    new = va.wrap(old.unwrap(), tgfom(16), processor=processor)
    new.add_adapter("c", tgfom(16))
    before, after = {"default": 32, "b": 32}, {"default": 16, "c": 16}

    point, killed = 0, True
    while killed:
        point += 1
        killed = run_killed(lambda: new.save_pretrained(target), kill_at=point)
        assert saved_sets(target) in (before, after), f"kill at point {point}: {saved_sets(target)}"
        assert (target / "NOTES.md").read_text() == "mine", "a file of the user's was lost"
    assert point > 4 and saved_sets(target) == after
    new.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"], "no staging or trash directory is left"


def test_adapter_tensors_of_an_integer_dtype_are_refused(tmp_path):
    model, processor = build_tiny("llava")
    va.wrap(model, tgfom(), processor=processor).save_adapters(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    save_file({k: v.to(torch.int64) for k, v in load_file(file).items()}, file)
    with pytest.raises(va.AdapterError, match=r"holds tensors of the wrong kind \(.* is torch.int64, expected "
                                              r"torch.float32"):
        va.load_adapters(build_tiny("llava")[0], tmp_path, processor=processor)


# -- a second run, another recipe's directory, a damaged state file ---------------------------------
def test_resume_into_another_recipes_output_is_refused_before_the_model_loads(ws, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "run"
    train(load_recipe(recipe_file(ws, out, train={"max_steps": 2})))
    other_data = tmp_path / "other.json"
    other_data.write_text((ws / "data.json").read_text())
    other = recipe_file(ws, out, "other", adapters=[{"method": "tgfom", "hidden_size": 16, "num_heads": 2}],
                        data={"json": str(other_data)}, train={"max_steps": 4, "seed": 7})
    loads = []
    monkeypatch.setattr(loop_module, "load_base", lambda *a, **k: loads.append(1))
    with pytest.raises(va.AdapterError, match=r"cannot resume .*step-00000002: it was written by another recipe "
                                              r"\(adapters.0.hidden_size was 32, now 16; data.json was .*; "
                                              r"train.seed was 42, now 7\)"):
        train(load_recipe(other), resume=True)
    assert not loads, "the base was loaded before the refusal"
    monkeypatch.undo()
    allowed = recipe_file(ws, out, "allowed", train={"max_steps": 3, "lr": 5e-4}, output={"keep_last": 3})
    assert train(load_recipe(allowed), resume=True).step == 3  # the documented changes still resume


def test_a_second_run_into_the_same_directory_stops_at_once_and_a_killed_one_does_not_block(ws, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    recipe = load_recipe(recipe_file(ws, out, train={"max_steps": 2}))
    refused = pytest.raises(va.AdapterError, match=rf"another run is training into {out} \(pid {os.getpid()} on "
                                                   r".*\): wait for it to finish, or choose another directory")
    with RunLock(out), refused:  # a run in progress (flock: any other open of the lock file is refused)
        train(recipe)
    assert not (out / "checkpoints").exists()
    assert run_killed(lambda: train(recipe), kind="rename", contains="step-00000002")  # kill -9 mid-run
    assert train(recipe, resume=True).step == 2  # the kernel dropped the dead run's lock


def test_an_output_dir_that_is_a_file_is_refused_before_the_model_loads(ws, tmp_path, monkeypatch):  # noqa: F811
    (tmp_path / "taken").write_text("a file")
    monkeypatch.setattr(loop_module, "load_base", lambda *a, **k: pytest.fail("the base was loaded"))
    for out in (tmp_path / "taken", tmp_path / "taken" / "run"):
        with pytest.raises(va.AdapterError, match=r"output.dir .*taken is a file, not a directory"):
            train(load_recipe(recipe_file(ws, tmp_path / "x", train={"max_steps": 1}, output={"dir": str(out)})))


@pytest.fixture(scope="module")
def two_checkpoints(ws, tmp_path_factory):  # noqa: F811
    """A training output with checkpoints step-1 and step-2 (copied by each test that damages one)."""
    out = tmp_path_factory.mktemp("two") / "run"
    train(load_recipe(recipe_file(ws, out, train={"max_steps": 2}, output={"save_every": 1, "keep_last": 0})))
    return out


@pytest.mark.parametrize("name, content", [
    ("trainer_state.json", "[]"),
    ("trainer_state.json", '{"step": "two"}'),
    ("rank-0.json", ('{"params": [], "optimizer": {"state": {"__tensor__": "nowhere"}, "param_groups": []}, '
                     '"rng": {"python": {}, "numpy": {}, "torch": {}}}')),
    ("rank-0.json", '{"params": [], "optimizer": {}, "rng": {}}'),
    ("adapter_config.json", '{"adapters": 1}'),
    ("trainer_state.json", "[" * 100_000 + "]" * 100_000),
    ("rank-0.json", b"\xff\xfe{}"),
])
def test_a_checkpoint_file_of_the_wrong_shape_falls_back_to_the_previous_one(two_checkpoints, tmp_path, name,
                                                                             content):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    file = out / "checkpoints" / "step-00000002" / name
    file.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert ckpt.damage(file.parent) is not None
    assert ckpt.resolve_adapter_dir(out).name == ("step-00000001" if name == "adapter_config.json"
                                                  else "step-00000002")
    assert ckpt.latest_intact(out).name == "step-00000001"  # what --resume continues from


def test_resume_past_a_checkpoint_of_the_wrong_shape_continues_from_the_one_before(two_checkpoints, ws, tmp_path):  # noqa: F811
    import shutil

    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    (out / "checkpoints" / "step-00000002" / "trainer_state.json").write_text("[]")
    result = train(load_recipe(recipe_file(ws, out, train={"max_steps": 3}, output={"save_every": 1,
                                                                                      "keep_last": 0})), resume=True)
    assert result.step == 3 and (out / "checkpoints" / "damaged-step-00000002").is_dir()


# -- recipes: duplicate keys, alias bombs, size, encoding; data files nested too deep ---------------
def recipe_text(tmp_path, text: str | bytes, name: str = "r"):
    path = tmp_path / f"{name}.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


BASE_RECIPE = "model: {name_or_path: m}\nadapters: [{method: tgfom}]\ndata: {json: d.json}\noutput: {dir: o}\n"


def test_a_duplicate_key_in_a_recipe_is_refused_with_both_lines(tmp_path):
    path = recipe_text(tmp_path, BASE_RECIPE + "train:\n  lr: 1e-3\n  lr: 0.9\n")
    with pytest.raises(va.AdapterError, match=r"r.yaml is not valid YAML: duplicate key 'lr' \(first on line 6\): "
                                              r"keep one of them.*line 7"):
        load_recipe(path)
    with pytest.raises(va.AdapterError, match="duplicate key 'model'"):
        load_recipe(recipe_text(tmp_path, BASE_RECIPE + "model: {name_or_path: other}\n", "twice"))
    good = recipe_text(tmp_path, BASE_RECIPE, "good")
    with pytest.raises(va.AdapterError, match="duplicate key 'a'"):
        load_recipe(good, ["model.quantization={a: 1, a: 2}"])
    anchored = BASE_RECIPE.replace("output: {dir: o}", "output: &o {dir: o, save_every: 5}")
    assert load_recipe(recipe_text(tmp_path, anchored, "anchored")).output.save_every == 5  # anchors still read


def test_an_alias_bomb_is_refused_at_once_and_no_message_carries_an_unbounded_value(tmp_path):
    import time

    lines = ['description: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"x{b}: &{b} [{', '.join([f'*{a}'] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")]
    doc = "\n".join(lines) + "\n" + BASE_RECIPE + "train: {lr: *i}\n"
    assert len(doc) < 1000  # 9**9 = 387 million values once expanded
    start = time.perf_counter()
    with pytest.raises(va.AdapterError, match=r"aliases \(\*name\) expand to more than 100,000 values") as err:
        load_recipe(recipe_text(tmp_path, doc))
    assert time.perf_counter() - start < 2 and len(str(err.value)) < 300
    long = BASE_RECIPE + "train: {lr: [" + ", ".join(["12345678"] * 5000) + "]}\n"
    with pytest.raises(va.AdapterError, match="train.lr: expected float, got") as err:
        load_recipe(recipe_text(tmp_path, long, "long"))
    assert len(str(err.value)) < 400  # the value quoted, cut short
    with pytest.raises(va.AdapterError, match="refers to the node that holds it"):
        load_recipe(recipe_text(tmp_path, BASE_RECIPE + "train: &t {betas: *t}\n", "loop"))


def test_a_huge_or_undecodable_recipe_is_refused_in_one_line(tmp_path):
    import time

    huge = recipe_text(tmp_path, BASE_RECIPE + "description: " + "x" * 2_000_000 + "\n")
    start = time.perf_counter()
    with pytest.raises(va.AdapterError, match=r"recipe .*r.yaml is 2,000,\d+ bytes, above the limit of 1,000,000"):
        load_recipe(huge)
    assert time.perf_counter() - start < 1
    latin = recipe_text(tmp_path, BASE_RECIPE.encode() + "description: caf\xe9\n".encode("latin-1"))
    with pytest.raises(va.AdapterError, match=r"r.yaml is not UTF-8 text \(byte 0xe9 at line 5\): save it as UTF-8"):
        load_recipe(latin)
    with pytest.raises(va.AdapterError, match="nested too deeply"):
        load_recipe(recipe_text(tmp_path, BASE_RECIPE + "description: " + "[" * 5000 + "]" * 5000 + "\n"))


@pytest.mark.parametrize("suffix, text, match", [
    (".json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (".json", b'[{"id": "caf\xe9"}]', r"not UTF-8 text \(byte 0xe9 at line 1\)"),
    (".jsonl", '{"id": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n", "line 2: the JSON is nested too deeply"),
    (".json", '{"id": 1}', "expected a JSON list"),
])
def test_a_data_file_nested_too_deep_or_not_utf8_is_one_line(tmp_path, suffix, text, match):
    from vlm_adapters.train.data import read_records

    path = tmp_path / f"data{suffix}"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(va.AdapterError, match=match):
        read_records(path, tmp_path)


# -- raw tracebacks: tiny images in TG-DP, generate's beams and bad settings ------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "perception_lm"])
def test_tgdp_takes_a_one_pixel_and_a_199_by_1_image(family):
    from .conftest import batch

    model, processor = build_tiny(family)
    wrapped = va.wrap(model, va.TGDPConfig(hidden_size=32, num_heads=2, num_latents=4), processor=processor)
    for size in ((1, 1), (199, 1), (1, 199)):
        image = Image.new("RGB", size, "red")
        inputs = batch(processor, ["What colour?"], [image])
        with torch.no_grad():
            out = wrapped(**inputs, images=[image]).logits
        assert out.shape[:2] == inputs["input_ids"].shape and torch.isfinite(out).all(), size


def test_semclip_generate_with_beams_or_several_samples_uses_the_crops_in_every_row():
    from .conftest import batch, make_image
    from .test_semclip import SEMCLIP

    model, processor = build_tiny("llava")
    wrapped = va.wrap(model, va.SemClipConfig(**SEMCLIP, top_k=1), processor=processor)
    pictures = [make_image(200, 150), make_image(120, 300, "blue")]
    inputs = batch(processor, ["What colour is it?"] * 2, pictures)
    with torch.no_grad():
        first = wrapped(**inputs, images=pictures).logits[:, -1]
        for settings in ({"num_beams": 2, "num_return_sequences": 2}, {"do_sample": True, "num_return_sequences": 3}):
            repeat = settings["num_return_sequences"]
            out = wrapped.generate(**inputs, images=pictures, max_new_tokens=2, return_dict_in_generate=True,
                                   output_logits=True, **settings)
            assert out.sequences.shape[0] == 2 * repeat
            assert torch.equal(out.sequences[:, :inputs["input_ids"].shape[1]],
                               inputs["input_ids"].repeat_interleave(repeat, 0))
            torch.testing.assert_close(out.logits[0], first.repeat_interleave(repeat, 0), atol=1e-4, rtol=1e-4)
        for bad in (0, -1, 1.5):
            with pytest.raises(va.AdapterError, match=rf"generate\(max_new_tokens={bad}\): give a whole number >= 1"):
                wrapped.generate(**inputs, images=pictures, max_new_tokens=bad)
        with pytest.raises(va.AdapterError, match="^generate: .*num_return_sequences"):
            wrapped.generate(**inputs, images=pictures, max_new_tokens=2, num_return_sequences=3)


# -- semclip label: the image root, labels that are not UTF-8 ---------------------------------------
def test_semclip_label_keeps_to_the_image_root_and_writes_relative_paths(tmp_path):
    from .test_semclip_train import OPTS, record, square_image

    (tmp_path / "images").mkdir()
    (tmp_path / "elsewhere").mkdir()
    square_image().save(tmp_path / "images" / "in.png")
    square_image(colour="blue").save(tmp_path / "elsewhere" / "out.png")
    records = [record("in", "in.png"), record("up", "../elsewhere/out.png"),
               record("abs", str(tmp_path / "elsewhere" / "out.png"))]
    (tmp_path / "data.json").write_text(json.dumps(records))
    base = ["semclip", "label", str(tmp_path / "data.json"), "--image-root", str(tmp_path / "images"), *OPTS]

    refused = runner.invoke(app, [*base, "--out", str(tmp_path / "a.jsonl")])
    assert refused.exit_code == 0, refused.output
    assert "skipped record up: image path '../elsewhere/out.png' leaves the image root" in refused.output
    assert "skipped record abs" in refused.output
    assert [x["id"] for x in read_labels(tmp_path / "a.jsonl")] == ["in"]

    allowed = runner.invoke(app, [*base, "--out", str(tmp_path / "b.jsonl"), "--allow-outside-root"])
    assert allowed.exit_code == 0, allowed.output
    labels = read_labels(tmp_path / "b.jsonl")
    assert [x["image"] for x in labels] == ["in.png", "../elsewhere/out.png", "../elsewhere/out.png"]  # relative
    train_args = ["semclip", "train", str(tmp_path / "b.jsonl"), "--image-root", str(tmp_path / "images"),
                  "--out", str(tmp_path / "psi"), "--epochs", "1", *OPTS]
    result = runner.invoke(app, train_args)
    assert result.exit_code == 2 and "their image paths leave the image root" in result.output
    assert runner.invoke(app, [*train_args, "--allow-outside-root"]).exit_code == 0


def test_labels_that_are_not_utf8_or_of_the_wrong_shape_are_one_line_on_rerun_and_in_train(tmp_path):
    from .test_semclip_train import OPTS, record, square_image

    (tmp_path / "images").mkdir()
    square_image().save(tmp_path / "images" / "0.png")
    (tmp_path / "data.json").write_text(json.dumps([record("r0", "0.png")]))
    good = '{"id": "r0", "image": "0.png", "question": "Q?", "answer": "red", "boxes": [[0, 0, 8, 8]], ' \
           '"loglik": [-1.0], "best": 0}\n'
    for name, content, match in [
        ("latin", good.encode() + b'{"id": "caf\xe9"}\n', r"labels.jsonl is not UTF-8 text \(byte 0xe9 at line 2\)"),
        ("boxes", good.replace("[[0, 0, 8, 8]]", '[["a", 0, 8, 8]]').encode(), "lists of numbers"),
        ("deep", good.encode() + b"[" * 100_000 + b"]" * 100_000 + b"\n", "line 2: the JSON is nested too deeply"),
    ]:
        out = tmp_path / name / "labels.jsonl"
        out.parent.mkdir()
        out.write_bytes(content)
        rerun = runner.invoke(app, ["semclip", "label", str(tmp_path / "data.json"), "--image-root",
                                    str(tmp_path / "images"), "--out", str(out), *OPTS])
        assert rerun.exit_code == 2 and len(rerun.output.strip().splitlines()) == 1, rerun.output
        assert re.search(match, rerun.output), rerun.output
        trained = runner.invoke(app, ["semclip", "train", str(out), "--image-root", str(tmp_path / "images"),
                                      "--out", str(tmp_path / name / "psi"), *OPTS])
        assert trained.exit_code == 2 and re.search(match, trained.output), trained.output


# -- images: EXIF orientation, a JPEG cut short, a size refusal that is not "corrupt" ---------------
def rotated_jpeg(path):
    """A 40x20 picture (red left half) saved as a 20x40 JPEG whose EXIF says: rotate 90 degrees."""
    upright = Image.new("RGB", (40, 20), "blue")
    upright.paste((255, 0, 0), (0, 0, 20, 20))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # how a camera held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the viewer turns it 90 degrees clockwise
    stored.save(path, exif=exif, quality=95)
    return upright


def test_exif_orientation_is_applied_in_training_infer_semclip_and_labelling(tmp_path):
    from vlm_adapters.inputs import open_image
    from vlm_adapters.semclip import labels as labels_module
    from vlm_adapters.train.data import load_image, read_records

    upright = rotated_jpeg(tmp_path / "cam.jpg")
    assert Image.open(tmp_path / "cam.jpg").size == (20, 40)
    opened = open_image(tmp_path / "cam.jpg")
    assert opened.size == (40, 20) and opened.getpixel((5, 10))[0] > 200 and opened.getpixel((35, 10))[2] > 200
    (tmp_path / "d.json").write_text(json.dumps([{"id": "a", "image": "cam.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}]}]))
    good, bad = read_records(tmp_path / "d.json", tmp_path)
    assert not bad and load_image(good[0]).size == upright.size  # what training sees
    from vlm_adapters.semclip.train import ScorerExample, _prepare

    example = ScorerExample(image=tmp_path / "cam.jpg", question="Where is red?", boxes=[(0, 0, 40, 20)], positive=0)
    image, boxes, _ = _prepare(example, None, "psi")  # a box of the upright picture fits it: SemClip reads it upright
    assert image.size == (40, 20) and boxes == [(0, 0, 40, 20)]
    assert labels_module.open_image is open_image  # labelling, infer and `semclip show` read files through it


def test_a_jpeg_cut_short_is_a_bad_record_when_checked_and_named_rightly_when_not(tmp_path):
    from vlm_adapters.train.data import load_image, read_records

    Image.new("RGB", (64, 48), "red").save(tmp_path / "whole.jpg", quality=90)
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 9 // 10])  # the header whole, the scan cut short
    with Image.open(tmp_path / "cut.jpg") as img:
        img.verify()  # what the old check did: passes
    (tmp_path / "d.json").write_text(json.dumps([{"id": i, "image": f"{i}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}]} for i in ("whole", "cut")]))
    good, bad = read_records(tmp_path / "d.json", tmp_path)
    assert [r.id for r in good] == ["whole"] and bad[0].id == "cut" and "truncated or corrupt" in bad[0].reason
    unchecked, _ = read_records(tmp_path / "d.json", tmp_path, check_images=False)
    with pytest.raises(va.AdapterError, match="record cut: .*truncated.*set data.check_images=true to find such"):
        load_image(unchecked[1])
    with pytest.raises(va.AdapterError, match="changed after the records were checked"):
        load_image(unchecked[1], checked=True)


def test_an_image_over_the_pixel_limit_is_refused_as_too_large_never_as_corrupt(tmp_path, monkeypatch):
    from vlm_adapters.errors import ImageTooLarge
    from vlm_adapters.inputs import MAX_PIXELS_ENV, open_image
    from vlm_adapters.train.data import read_records

    Image.new("RGB", (100, 100), "white").save(tmp_path / "big.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "5000")
    with pytest.raises(ImageTooLarge) as err:
        open_image(tmp_path / "big.png")
    assert "corrupt" not in str(err.value) and "truncated" not in str(err.value) and MAX_PIXELS_ENV in str(err.value)
    (tmp_path / "d.json").write_text(json.dumps([{"id": "big", "image": "big.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "White."}]}]))
    _, bad = read_records(tmp_path / "d.json", tmp_path)
    assert "above the limit" in bad[0].reason and "corrupt" not in bad[0].reason


# -- devices -----------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize("args, match", [
    (["--device", "cuda"], "--device 'cuda': this machine has no cuda device"),
    (["--device", "cuda:x"], "--device 'cuda:x': not a device name"),
    (["--device-map", "cuda:0"], "device_map 'cuda:0': this machine has no cuda device"),
    (["--device-map", '{"model.vision_towr": "cpu", "": "cpu"}'],
     (r"device_map names modules LlavaForConditionalGeneration does not have: 'model.vision_towr' \(did you mean "
      r"'model.vision_tower'\?\)")),
])
def test_a_device_or_device_map_this_machine_or_model_lacks_is_one_line(tmp_path_factory, args, match, monkeypatch):
    from vlm_adapters.train import model as model_module

    from .conftest import make_image, save_tiny

    root = tmp_path_factory.getbasetemp() / "devices"
    if not root.exists():
        save_tiny(root / "model")
        make_image().save(root / "image.png")
    monkeypatch.setattr(model_module, "_pickle_only", lambda d: loaded.append(d) or False)  # load_base ran
    loaded = []
    result = runner.invoke(app, ["infer", "--model", str(root / "model"), "--image", str(root / "image.png"),
                                 "--question", "What?", *args])
    assert result.exit_code == 2 and re.search(match, result.output), result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not loaded or "device_map" in match  # --device is refused before the model loads


@pytest.mark.parametrize("change, match", [
    (lambda v: v[..., :1].contiguous() if v.dim() else v, "does not fit this architecture: wrong shapes"),
    (lambda v: v.to(torch.int32), "holds tensors of the wrong kind"),
])
def test_text_weights_of_the_wrong_shape_or_dtype_are_one_line(tmp_path, change, match):
    from vlm_adapters.config import TextConfig
    from vlm_adapters.text import build_text_encoder

    from .test_text import OPEN_CLIP

    first = build_text_encoder(TextConfig(backend="open_clip", name=OPEN_CLIP, seed=3), None, None)
    weights = tmp_path / "text.safetensors"
    save_file({k: change(v.contiguous()) for k, v in first.model.state_dict().items()}, str(weights))
    with pytest.raises(va.AdapterError, match=match):
        build_text_encoder(TextConfig(backend="open_clip", name=OPEN_CLIP, weights=str(weights)), None, None)


def test_lora_weights_of_an_integer_dtype_are_refused(tmp_path):
    model, processor = build_tiny("llava")
    recipe = recipe_from_dict({"model": {"name_or_path": "x"}, "adapters": [{"method": "tgfom", **SMALL}],
                               "trainable": {"lora": {"r": 2, "alpha": 4}}, "data": {"json": "d.json"},
                               "output": {"dir": "o"}})
    build_trainable(model, processor, recipe).save_pretrained(tmp_path)
    file = tmp_path / "lora" / "adapter_model.safetensors"
    save_file({k: v.to(torch.int64) for k, v in load_file(file).items()}, file)
    with pytest.raises(va.AdapterError, match="lora/adapter_model.safetensors holds tensors of the wrong kind"):
        load_trained(build_tiny("llava")[0], tmp_path, processor)


def test_resume_changes_name_each_refused_setting_and_ignore_fields_a_later_version_added():
    from vlm_adapters.train.run_dir import resume_changes

    saved = {"model": {"name_or_path": "m"}, "adapters": [{"method": "tgfom", "hidden_size": 32}],
             "data": {"json": "a"}, "train": {"lr": 1.0}, "trainable": {"lora": None}, "output": {"dir": "x"}}
    later = {"model": {"name_or_path": "m", "revision": None}, "adapters": [{"method": "tgfom", "hidden_size": 32,
                                                                             "new_field": 1}],
             "data": {"json": "a", "new_flag": False}, "train": {"lr": 2.0}, "trainable": {"lora": None},
             "output": {"dir": "moved"}}
    assert resume_changes(saved, later) == []  # lr and output.* may change; new fields ran at their defaults
    later["adapters"].append({"method": "tgdp"})
    later["trainable"]["lora"] = {"r": 4}
    later["model"]["name_or_path"] = "other"
    assert resume_changes(saved, later) == ["adapters.1.method was None, now 'tgdp'",
                                            "model.name_or_path was 'm', now 'other'", "trainable.lora.r was None, now 4"]


def test_an_override_of_one_aliased_entry_changes_that_entry_only(tmp_path):
    text = ("model: {name_or_path: m}\nadapters: [&a {method: tgfom, hidden_size: 32, num_heads: 2}, *a]\n"
            "data: {json: d.json}\noutput: {dir: o}\n")
    from vlm_adapters.train.parse import apply_overrides
    from vlm_adapters.train.recipe import read_recipe_yaml

    _, data = read_recipe_yaml(recipe_text(tmp_path, text))
    changed = apply_overrides(data, ["adapters.0.hidden_size=64"])
    assert [a["hidden_size"] for a in changed["adapters"]] == [64, 32]
