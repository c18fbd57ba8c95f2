"""A tiny run of the effect benchmark's whole pipeline (every row, one seed), and the base's cache."""

import json

import pytest
import torch
from PIL import Image

from vlm_adapters.bench import base_model
from vlm_adapters.bench.base_model import BaseConfig, cache_key, lm_batch, load_or_train
from vlm_adapters.bench.effect import METHODS, EffectConfig, report, run
from vlm_adapters.bench.evaluate import views_prompt
from vlm_adapters.bench.world import WorldConfig, make_samples
from vlm_adapters.errors import AdapterError

WORLD = WorldConfig(canvas_size=96, num_objects=2, object_size=12)
BASE = BaseConfig(size="tiny", steps=2, batch_size=4, image_size=32, check_every=1, check_samples=2,
                  min_focus=0.0, min_gap=-1.0)  # two steps learn nothing: the bar is off to test the plumbing


def test_tiny_pipeline(tmp_path):
    config = EffectConfig(world=WORLD, base=BASE, seeds=1, eval_samples=4, psi_samples=2,
                          psi_epochs=1, steps=1, batch_size=4, clip_steps=2, cache=tmp_path / "cache", progress=False)
    lines = []
    results = run(config, out=tmp_path / "r.json", png=tmp_path / "r.png", echo=lines.append)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert list(saved["summary"]) == list(METHODS) and saved["summary"] == json.loads(json.dumps(results["summary"]))
    summary = results["summary"]
    assert all(0 <= r["accuracy_mean"] <= 1 for r in summary.values())
    base = summary["base"]["tokens"]
    assert base == 16 and summary["semclip-oracle"]["tokens"] == 2 * base
    assert summary["tgdp"]["tokens"] == base + 16 and summary["tie"]["tokens"] == base
    assert summary["tie"]["trainable"] == summary["tie-control"]["trainable"] > 0  # same parameters
    assert summary["tgfom"]["curve"] and summary["tgfom-control"]["curve"][0][0] == 1  # learning curves
    assert summary["semclip-oracle"]["trainable"] == 0 and summary["semclip-scorer"]["trainable"] > 0
    assert summary["semclip-target"]["target_in_crop"] == 1.0  # here every target fits in a candidate crop
    assert all(r["target_half_in_crop"] >= r["target_in_crop"] for m, r in summary.items() if m.startswith("semclip"))
    assert saved["scorer_weights"].endswith(".safetensors")  # the world-trained stand-in CLIP
    assert set(saved["base"]["view_accuracy"]) == {"overview", "crop", "overview+crop", "alone"}
    record = saved["provenance"]  # which base, which settings, which command and version
    assert record["base_model"]["name_or_path"] == saved["base"]["path"] and record["settings"]["steps"] == 1
    assert record["library_version"] and record["command"]
    assert any(line.startswith("| method |") for line in lines)
    page = report(results, "vlm-adapters bench effect --seeds 1")
    assert "`vlm-adapters bench effect --seeds 1`" in page and "| tie-control |" in page
    assert "accuracy (1 seed)" in page and "± 0.0%" not in page  # one seed: no std to show
    with Image.open(tmp_path / "r.png") as image:
        assert image.width > 300 and image.height > 300


def test_zero_training_rows_choose_crops_with_nothing_trained(tmp_path):
    """semclip-attention (the base's own relative attention) and semclip-clip (CLIP's cosine, no heads)."""
    config = EffectConfig(world=WORLD, base=BASE, seeds=1, eval_samples=4, batch_size=4, clip_steps=2,
                          cache=tmp_path / "cache", progress=False,
                          methods=("base", "semclip-attention", "semclip-clip", "semclip-target"))
    results = run(config, echo=lambda line: None)
    summary, seed = results["summary"], results["per_seed"][0]
    assert list(summary) == ["base", "semclip-attention", "semclip-clip", "semclip-target"]
    for name in ("semclip-attention", "semclip-clip"):
        row = summary[name]
        assert row["trainable"] == 0 and row["train_s"] == 0.0 and row["tokens"] == 2 * summary["base"]["tokens"]
        assert 0 <= row["target_in_crop"] <= row["target_half_in_crop"] <= 1
        assert 0 <= row["psi_agreement_with_oracle"] <= 1
    n_layers = len(base_model.load_or_train(WORLD, BASE, tmp_path / "cache", progress=False)[0]
                   .get_decoder().layers)
    assert seed["semclip-attention"]["layers"] == [int(0.5 * (n_layers - 1) + 0.5)]  # the depth rule's layer
    assert "layers" not in seed["semclip-clip"]


def test_base_is_cached(tmp_path, monkeypatch):
    model, _, path, info = load_or_train(WORLD, BASE, tmp_path, progress=False)
    assert info["steps_run"] == 2 and [h["step"] for h in info["history"]] == [1, 2]
    assert set(info["view_accuracy"]) == {"overview", "crop", "overview+crop", "alone"}
    monkeypatch.setattr(base_model, "train_base", lambda *a, **k: pytest.fail("retrained a cached base"))
    again, _, same, _ = load_or_train(WORLD, BASE, tmp_path, progress=False)
    assert same == path and all((a == b).all() for a, b in zip(model.parameters(), again.parameters()))
    assert cache_key(WORLD, BASE) != cache_key(WorldConfig(canvas_size=96, num_objects=3, object_size=12), BASE)
    assert cache_key(WORLD, BASE) == cache_key(WorldConfig(canvas_size=96, num_objects=2, object_size=12, seed=9), BASE)
    assert cache_key(WORLD, BASE) != cache_key(WORLD, BaseConfig(size="tiny", steps=3, batch_size=4, image_size=32))


def test_early_stop_and_bar(tmp_path):
    """Training stops once the focused view reaches stop_at; a base below the bar stops the benchmark
    with its view accuracies named, and nothing is written."""
    quick = BaseConfig(size="tiny", steps=50, batch_size=4, image_size=32, check_every=3, check_samples=2,
                       stop_at=0.0)
    _, _, history = base_model.train_base(WORLD, quick, progress=False)
    assert [h["step"] for h in history] == [3]  # stop_at 0 is met at the first check
    strict = BaseConfig(size="tiny", steps=2, batch_size=4, image_size=32, check_every=1, check_samples=2,
                        min_focus=1.01)
    config = EffectConfig(world=WORLD, base=strict, seeds=1, eval_samples=2, steps=1, batch_size=2,
                          methods=("base",), cache=tmp_path, progress=False)
    with pytest.raises(AdapterError, match=r"fails the benchmark's bar \(overview .*crop .*\).*No results"):
        run(config, out=tmp_path / "r.json", png=tmp_path / "r.png", echo=lambda _: None)
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "r.png").exists()
    check = base_model.check_bar
    check({"overview": 0.3, "crop": 0.9}, BaseConfig())
    with pytest.raises(AdapterError, match="does not hide"):
        check({"overview": 0.85, "crop": 0.9}, BaseConfig())
    with pytest.raises(AdapterError, match="alone accuracy 40.0%"):
        check({"overview": 0.3, "alone": 0.4}, BaseConfig(regime="clutter"))


def test_recovery_is_the_share_of_the_ceilings_gain():
    from vlm_adapters.bench.effect import recovery

    rows = {"base": 0.25, "semclip-scorer": 0.7, "semclip-target": 0.85}
    assert recovery({m: {"accuracy_mean": a} for m, a in rows.items()}) == pytest.approx(0.75)
    assert recovery({"base": {"accuracy_mean": 0.5}, "semclip-scorer": {"accuracy_mean": 0.6},
                     "semclip-target": {"accuracy_mean": 0.4}}) is None  # no gain to recover
    assert recovery({"base": {"accuracy_mean": 0.5}}) is None


def test_labels_only_on_the_answer(tmp_path):
    _, processor = base_model.build(WORLD, BASE)
    samples = make_samples(WORLD, n=2)
    prompts = [views_prompt(processor, s.question, views) for s, views in zip(samples, (1, 2))]
    inputs = lm_batch(processor, prompts, ["vertical", "diagonal"], [samples[0].image, [samples[1].image] * 2])
    tok = processor.tokenizer
    for row, answer in zip(inputs["labels"], ["vertical", "diagonal"]):
        assert tok.decode(row[row != -100]) == f" {answer}{tok.eos_token}"
    assert (inputs["input_ids"] == tok.convert_tokens_to_ids(tok.image_token)).sum(1).tolist() == [16, 32]


def test_bad_options():
    with pytest.raises(AdapterError, match="unknown methods"):
        EffectConfig(methods=("base", "magic"))
    with pytest.raises(AdapterError, match="base size"):
        BaseConfig(size="huge")


def test_sparse_tgdp_can_be_named():
    """`--methods tgdp-k1,tgdp-k1-control`: sparse TG-DP beside its control, outside 'all'."""
    from vlm_adapters.bench.effect import adapter_configs

    config = EffectConfig(methods=("tgdp", "tgdp-k1", "tgdp-k1-control"))
    assert "tgdp-k1" in config.methods and "tgdp-k1" not in METHODS
    (sparse,), (full,) = adapter_configs("tgdp-k1"), adapter_configs("tgdp")
    assert sparse.tiles == 1 and full.tiles is None and sparse.num_latents == full.num_latents


def test_sparse_tgdp_row_reports_whether_its_tile_holds_the_target(tmp_path):
    from vlm_adapters.integrations.base import tile_box

    assert tile_box((128, 128), 3, 2.0) == (64, 64, 128, 128)
    assert tile_box((200, 100), 0, 2.0, centre_crop=True) == (50, 0, 100, 50)  # the centre square's quadrant
    config = EffectConfig(world=WORLD, base=BASE, seeds=1, eval_samples=4, steps=1, batch_size=2,
                          methods=("base", "tgdp-k1"), cache=tmp_path / "cache", progress=False)
    row = run(config, out=tmp_path / "r.json", echo=lambda line: None)["summary"]["tgdp-k1"]
    assert 0 <= row["target_in_crop"] <= row["target_half_in_crop"] <= 1


def test_psi_chooses_sparse_tgdp_tiles_on_canvases_of_fewer_objects(tmp_path, monkeypatch):
    """`--objects 1 --methods semclip-scorer,tgdp-k1-psi,...`: the adapters see one-object canvases of the
    base's world; psi is trained once per seed and then picks the sparse TG-DP row's tile."""
    from vlm_adapters.bench import effect
    from vlm_adapters.semclip import train

    with pytest.raises(AdapterError, match="objects=3"):
        EffectConfig(world=WORLD, objects=3)
    trainings, worlds = [], []
    real, real_samples = train.train_scorer, effect.make_samples
    monkeypatch.setattr(train, "train_scorer", lambda *a, **k: trainings.append(1) or real(*a, **k))
    monkeypatch.setattr(effect, "make_samples",
                        lambda w, *a, **k: worlds.append(w.num_objects) or real_samples(w, *a, **k))
    config = EffectConfig(world=WORLD, base=BASE, seeds=1, eval_samples=4, psi_samples=2, psi_epochs=1, steps=1,
                          batch_size=2, objects=1, clip_steps=2, cache=tmp_path / "cache", progress=False,
                          methods=("base", "semclip-scorer", "tgdp-k1-psi", "tgdp-k1-psi-control"))
    results = run(config, out=tmp_path / "r.json", echo=lambda line: None)
    rows = results["summary"]
    assert len(trainings) == 1  # one psi a seed, shared by SemClip's row and the sparse TG-DP rows
    for m in ("tgdp-k1-psi", "tgdp-k1-psi-control"):
        assert 0 <= rows[m]["target_in_crop"] <= rows[m]["target_half_in_crop"] <= 1
    assert rows["tgdp-k1-psi"]["trainable"] == rows["tgdp-k1-psi-control"]["trainable"] > 0
    assert worlds and set(worlds) == {1}  # held-out and training samples: one object a canvas
    assert "training samples of 1 object a canvas (the base's world: 2)" in report(results, "cmd")


def test_fit_backs_off_and_stops_on_the_callbacks_word():
    """'backoff' halves the learning rate for the rest of training; 'stop' ends it."""
    import torch

    from vlm_adapters.bench.fit import fit

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return type("Out", (), {"loss": (self.w * x).pow(2).sum()})()

    model, seen = Tiny(), []

    def callback(step, loss):
        seen.append(step)
        return {1: "backoff", 3: "stop"}.get(step)

    steps_before = []
    original = torch.optim.AdamW.step

    def record(self, *a, **k):
        steps_before.append(self.param_groups[0]["lr"])
        return original(self, *a, **k)

    torch.optim.AdamW.step = record
    try:
        losses = fit(model, list(model.parameters()), lambda s: ({"x": torch.ones(3)}, {}), steps=40, lr=0.1,
                     progress=False, callback=callback, schedule="constant")
    finally:
        torch.optim.AdamW.step = original
    assert len(losses) == 4 and seen == [0, 1, 2, 3]  # stopped after step 3
    assert steps_before[2:] == pytest.approx([0.05, 0.05])  # after step 1 (warm-up's end): half of lr 0.1


def test_where_regime_base_sees_one_object_and_the_question_names_its_cell(tmp_path):
    from vlm_adapters.bench.base_model import training_world
    from vlm_adapters.bench.effect import regime_world

    world = regime_world("where")
    base = BaseConfig(size="tiny", regime="where", steps=1, batch_size=4, check_every=1, check_samples=2,
                      min_focus=0.0, min_gap=-1.0)
    seen = training_world(world, base)
    assert (seen.num_objects, seen.grid, seen.refer) == (1, 2, "place") and world.num_objects == 4
    assert all(s.question.startswith("What pattern is on the object at the ") for s in make_samples(seen, 8))
    config = EffectConfig(world=world, base=base, seeds=1, eval_samples=4, steps=1, batch_size=4,
                          methods=("base", "tgfom", "tgfom-control"), cache=tmp_path, progress=False)
    results = run(config, echo=lambda *_: None)
    assert set(results["summary"]) == {"base", "tgfom", "tgfom-control"}
    assert results["config"]["world"]["refer"] == "place"


def test_world_sweep_records_each_base_and_its_verdict(tmp_path):
    """The sweep trains (or reuses) a base per variant and reports a base below the bar as FAILED,
    never as an error; a second run reuses the cache."""
    from vlm_adapters.bench.sweep import VARIANTS, sweep, table

    assert len(VARIANTS) >= 4 and {r for r, _ in VARIANTS.values()} == {"detail", "clutter", "where"}
    base = BaseConfig(size="tiny", steps=1, batch_size=2, check_every=1, check_samples=2)
    rows = sweep(("clutter-3-objects-12px", "where"), base, tmp_path, progress=False, echo=lambda *_: None)
    assert [r["variant"] for r in rows] == ["clutter-3-objects-12px", "where"]
    assert all(not r["meets_bar"] and "No results were written" in r["why"] for r in rows)  # one step learns nothing
    text = table(rows)
    assert "num_objects=3, object_size=12" in text and "FAILED" in text
    again = sweep(("where",), base, tmp_path, progress=False, echo=lambda *_: None)
    assert again[0]["path"] == rows[1]["path"] and again[0]["view_accuracy"] == rows[1]["view_accuracy"]
    with pytest.raises(AdapterError, match="unknown world variants"):
        sweep(("nowhere",), base, tmp_path)


def test_a_run_split_by_seed_combines_to_the_whole_run(tmp_path):
    """Parts written with first_seed join (combine) into what one run over all seeds reports; parts
    of different runs, or with overlapping seeds, are refused."""
    from vlm_adapters.bench.effect import combine

    def part(first, seeds, steps=1):
        config = EffectConfig(world=WORLD, base=BASE, seeds=seeds, first_seed=first, eval_samples=4, steps=steps,
                              batch_size=4, methods=("base", "tie", "tie-control"), cache=tmp_path, progress=False)
        return json.loads(json.dumps(run(config, echo=lambda *_: None)))

    whole, a, b = part(0, 2), part(0, 1), part(1, 1)
    joined = combine([b, a])
    assert joined["seeds"] == [0, 1] and joined["config"]["seeds"] == 2 and joined["config"]["first_seed"] == 0
    for method, row in whole["summary"].items():
        assert joined["summary"][method]["accuracy_mean"] == pytest.approx(row["accuracy_mean"])
        assert joined["summary"][method]["accuracy_std"] == pytest.approx(row["accuracy_std"])
    assert "2 seeds" in report(joined, "x")
    with pytest.raises(AdapterError, match="disjoint seeds"):
        combine([a, a])
    with pytest.raises(AdapterError, match="differ in \\['steps'\\]"):
        combine([a, part(1, 1, steps=2)])


def test_lora_rows_train_lora_beside_the_adapters(tmp_path):
    from vlm_adapters.bench.base_model import load_or_train

    with pytest.raises(AdapterError, match="--lora 8"):
        EffectConfig(methods=("base", "lora"))
    config = EffectConfig(world=WORLD, base=BASE, seeds=1, eval_samples=4, steps=2, batch_size=2, lora=2,
                          methods=("base", "lora", "tgdp"), cache=tmp_path / "cache", progress=False)
    summary = run(config, out=tmp_path / "r.json", echo=lambda line: None)["summary"]
    model = load_or_train(config.world, config.base, cache=tmp_path / "cache", progress=False)[0]
    projections = [m for n, m in model.named_modules()
                   if "language_model" in n and n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "o_proj")]
    lora = sum(2 * (m.in_features + m.out_features) for m in projections)  # r x (in + out) each
    assert projections and summary["lora"]["trainable"] == lora  # LoRA alone: the frozen TG-FOM adds nothing
    assert summary["tgdp"]["trainable"] > lora


def test_cotrained_rows_train_the_projector_and_leave_the_base_as_it_was(tmp_path):
    """--projector / --tower-blocks: every trained row co-trains those parts beside its adapter, 'cotrain' trains
    them alone, and each row starts from the same base (the shared model's weights are restored after a row)."""
    from vlm_adapters.bench.base_model import load_or_train
    from vlm_adapters.integrations import get_shim

    with pytest.raises(AdapterError, match="--projector"):
        EffectConfig(methods=("base", "cotrain"))
    config = EffectConfig(world=WORLD, base=BASE, seeds=1, eval_samples=4, steps=2, batch_size=2, projector=True,
                          tower_blocks=1, lr=0.1, methods=("cotrain", "tgfom", "tgfom-control"),
                          cache=tmp_path / "cache", progress=False)
    model, processor = load_or_train(config.world, config.base, cache=tmp_path / "cache", progress=False)[:2]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lines = []
    results = run(config, out=tmp_path / "r.json", echo=lines.append)
    summary = results["summary"]
    shim = get_shim(model, processor.tokenizer)
    parts = sum(p.numel() for p in shim.projector().parameters()) + sum(
        p.numel() for p in shim.vision_blocks()[-1].parameters())
    assert summary["cotrain"]["trainable"] == parts  # the frozen TG-FOM adds nothing
    assert summary["tgfom"]["trainable"] == summary["tgfom-control"]["trainable"] > parts
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "co-training the projector and the vision tower's last 1 block(s)" in report(results, "cmd")
    rows = results["per_seed"][0]
    assert "grad_norms" not in rows["cotrain"] and rows["tgfom"]["grad_norms"][0][1] > 0  # diagnosis (d)


def test_code_rows_give_the_adapter_a_code_of_the_targets_cell():
    from vlm_adapters.bench.effect import code_word, regime_world, split_variant

    assert split_variant("tie-code") == ("tie", "code") and split_variant("tgdp-k1-psi-control")[1] == "control"
    where = regime_world("where")
    samples = make_samples(where, 40, seed=3)
    words = {code_word(s, where): s.question for s in samples}
    assert len(words) == 4 and len(set(words.values())) == 4  # one word per cell, one cell per word
    detail = make_samples(WORLD, 20, seed=1)
    for s in detail:  # no grid: the quadrant of the target's centre
        x, y = (s.box[0] + s.box[2]) / 2, (s.box[1] + s.box[3]) / 2
        assert code_word(s, WORLD) == "0123"[2 * (y >= 48) + (x >= 48)]


def test_diagnosis_headroom_views_and_text_separation(tmp_path):
    """bench diagnose's (a) and (c) on a tiny base: every view runs, keeping every token is the base itself,
    and the code words are told apart better than the world's questions."""
    from vlm_adapters.bench import diagnose as d
    from vlm_adapters.config import TextConfig

    model, processor = load_or_train(WORLD, BASE, cache=tmp_path / "cache", progress=False)[:2]
    samples = make_samples(WORLD, 4, seed=5)
    views = d.headroom(model, processor, WORLD, samples, batch_size=2)
    assert set(views) == set(d.VIEWS) and all(0 <= v <= 1 for v in views.values())
    assert d.token_keep_mask((0, 0, 96, 96), 96, 4).all() and d.token_keep_mask((0, 0, 10, 10), 96, 4).sum() == 1
    from vlm_adapters.bench.evaluate import predict

    with d.replaced_projector_input(model, processor, [torch.ones(16, dtype=torch.bool)] * 4, None):
        kept = predict(model, processor, samples, batch_size=4)
    assert kept == predict(model, processor, samples, batch_size=4)  # keeping every token changes nothing
    sep = d.text_separation(model, processor, WORLD, {"vlm": TextConfig()})["vlm"]
    assert sep["questions"]["pairs"] == len(d.questions(WORLD)) * (len(d.questions(WORLD)) - 1) // 2
    assert -1 <= sep["codes"]["pooled_max"] <= 1 and sep["questions"]["token_min"] <= sep["questions"]["token_mean"]
    assert "| vlm |" in d.report(dict(regime="detail", samples=4, headroom=views, text={"vlm": sep}))


def test_a_table_with_guided_rows_says_what_the_evidence_is():
    from vlm_adapters.bench.effect import EVIDENCE, table

    row = dict(accuracy_mean=0.25, accuracy_std=0.0, tokens=36, trainable=0, train_s=0.0, eval_s=0.0)
    assert EVIDENCE in table({"base": row, "tgfom": row, "tgfom-control": row}, 1)
    assert EVIDENCE not in table({"base": row, "semclip-random": row}, 1)
    assert "clean code" in table({"tie-code": row}, 1) and "alone, no adapter" in table({"cotrain": row}, 1)
