"""lmms-eval integration: the exported world task runs end to end on a tiny model, base and wrapped,
and lmms-eval's scores equal the project's own evaluation; bad arguments fail before any work."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("lmms_eval")

from vlm_adapters import TGFOMConfig, wrap  # noqa: E402
from vlm_adapters.bench.evaluate import accuracy, normalise, predict  # noqa: E402
from vlm_adapters.bench.world import WorldConfig, answers, make_samples  # noqa: E402
from vlm_adapters.cli.main import app  # noqa: E402
from vlm_adapters.errors import AdapterError  # noqa: E402
from vlm_adapters.eval import export_world  # noqa: E402
from vlm_adapters.eval.export import read_world_config  # noqa: E402
from vlm_adapters.eval.load import load, plan, semclip_settings  # noqa: E402
from vlm_adapters.eval.world_task import process_results  # noqa: E402
from vlm_adapters.inputs import chat_prompt  # noqa: E402
from vlm_adapters.tiny import tiny_clip  # noqa: E402

from .conftest import save_tiny  # noqa: E402

WORLD = WorldConfig(num_samples=2)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny LLaVA saved with save_pretrained, TG-FOM adapters (weights moved off their init so they
    change the answers) saved beside it, and the world exported as a task directory."""
    root = tmp_path_factory.mktemp("eval")
    model, processor = save_tiny(root / "base")
    wrapped = wrap(model, TGFOMConfig(), processor=processor)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in wrapped.trainable_parameters():
            param.normal_(0, 0.5)
    wrapped.save_adapters(root / "adapters")
    export_world(root / "world", WORLD)
    return root


@pytest.fixture(scope="module")
def runs(saved):
    """lmms-eval's results for the base and the wrapped model, through the registered model name."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    out = {}
    with pytest.MonkeyPatch.context() as env:
        for key, value in {**OFFLINE, "HF_DATASETS_CACHE": str(saved / "cache")}.items():
            env.setenv(key, value)
        manager = TaskManager("ERROR", include_path=str(saved / "world"), include_defaults=False)
        for kind, extra in (("base", ""), ("wrapped", f",adapters={saved / 'adapters'}")):
            out[kind] = simple_evaluate(model="vlm_adapters", model_args=f"pretrained={saved / 'base'}{extra}",
                                        tasks=["vlm_world", "vlm_world_mc"], task_manager=manager, batch_size=3,
                                        log_samples=True, verbosity="ERROR")
    return out


def responses(result, task):
    return [s["resps"] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def reference_losses(model, processor, sample) -> list[float]:
    """Each choice's mean per-token loss, one unbatched forward each: the loss the model itself computes."""
    prompt = chat_prompt(processor, sample.question)
    start = processor(images=[sample.image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    losses = []
    for choice in answers(WORLD):
        inputs = processor(images=[sample.image], text=[f"{prompt} {choice}"], return_tensors="pt")
        labels = inputs["input_ids"].clone()
        labels[:, :start] = -100
        with torch.no_grad():
            losses.append(model(**inputs, labels=labels).loss.item())
    return losses


@pytest.mark.parametrize("kind", ["base", "wrapped"])
def test_world_task_matches_own_evaluation(saved, runs, kind):
    result, samples = runs[kind], make_samples(WORLD)
    model, processor = load(plan(str(saved / "base"), saved / "adapters" if kind == "wrapped" else None))
    assert hasattr(model, "adapters") == (kind == "wrapped")

    # generation: the same answers, so the same accuracy
    own = predict(model, processor, samples, batch_size=1, max_new_tokens=8)  # batched differently
    theirs = [normalise(r[0][0]) for r in responses(result, "vlm_world")]
    assert theirs == own
    assert result["results"]["vlm_world"]["accuracy,none"] == pytest.approx(accuracy(own, samples))

    # log-likelihood (batched, left-padded) against one plain forward per choice
    gold = [answers(WORLD).index(s.answer) for s in samples]
    reference = [reference_losses(model, processor, s) for s in samples]
    losses = [[pair[0] for (pair,) in r] for r in responses(result, "vlm_world_mc")]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), atol=1e-4, rtol=0)
    expected = sum(min(range(len(r)), key=r.__getitem__) == g for r, g in zip(reference, gold)) / len(samples)
    assert result["results"]["vlm_world_mc"]["acc,none"] == pytest.approx(expected)


def test_adapters_change_the_scores(runs):
    base, wrapped = (responses(runs[k], "vlm_world_mc") for k in ("base", "wrapped"))
    assert base != wrapped


def test_model_is_registered_with_lmms_eval():
    from lmms_eval.models import get_model

    from vlm_adapters.eval.model import VLMAdapters

    assert get_model("vlm_adapters") is VLMAdapters


def test_export_is_self_contained(saved):
    names = sorted(p.name for p in (saved / "world").iterdir())
    assert names == ["vlm_world.yaml", "vlm_world_mc.yaml", "world.json", "world.parquet"]
    text = (saved / "world" / "vlm_world.yaml").read_text()
    assert "data_files" in text and str(saved) not in text  # relative: the directory can move
    assert read_world_config(saved / "world" / "world.json") == WORLD  # world.json re-makes the samples


def test_scoring_normalises_like_the_project():
    assert process_results({"answer": "plus"}, [" Plus.\nand more"]) == {"accuracy": 1.0}
    assert process_results({"answer": "plus"}, ["cross"]) == {"accuracy": 0.0}


def test_semclip_settings(saved, tmp_path):
    assert semclip_settings(True) == semclip_settings("true") == {} and semclip_settings(None) is None
    assert semclip_settings('{"top_k": 2}') == {"top_k": 2}
    with pytest.raises(AdapterError, match="top_kk"):
        semclip_settings('{"top_kk": 2}')
    with pytest.raises(AdapterError, match="not JSON"):
        semclip_settings("{top_k: 2}")
    with pytest.raises(AdapterError, match="no SemClip"):
        plan(str(saved / "base"), saved / "adapters", '{"top_k": 2}')
    settings = {"scorer_arch": tiny_clip(), "min_crop_size": 8, "top_k": 1}
    model, _ = load(plan(str(saved / "base"), None, settings))
    assert list(model.adapters) == ["semclip"] and model.adapters["semclip"].config.top_k == 1
    model.save_adapters(tmp_path / "semclip")  # a saved SemClip: settings tune its inference knobs only
    tuned, _ = load(plan(str(saved / "base"), tmp_path / "semclip", {"top_k": 2}))
    assert tuned.adapters["semclip"].config.top_k == 2
    with pytest.raises(AdapterError, match="fixed by the saved scorer"):
        plan(str(saved / "base"), tmp_path / "semclip", {"scorer_seed": 1})


def test_bad_model_or_adapters_fail_before_any_work(saved, tmp_path):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path / "llama")  # a config and no weights: loading them would fail otherwise
    with pytest.raises(AdapterError, match="not supported"):
        plan(str(tmp_path / "llama"))
    with pytest.raises(AdapterError, match="adapter directory not found"):
        plan(str(saved / "base"), tmp_path / "missing")
    with pytest.raises(AdapterError, match="does not record its base model"):
        plan(None, saved / "adapters")  # saved from a model built in memory: no name to default to

    runner = CliRunner()
    cases = [(["--model", str(saved / "base"), "--adapters", str(tmp_path / "missing")], "adapter directory not found"),
             (["--model", str(tmp_path / "llama")], "LlamaForCausalLM) is not supported")]
    for args, message in cases:
        result = runner.invoke(app, ["eval", *args, "--tasks", "vlm_world"], env=OFFLINE)
        assert result.exit_code == 2 and message in result.output, result.output


def test_cli_exports_the_world(tmp_path):
    result = CliRunner().invoke(app, ["eval", "--export-world", str(tmp_path / "w"), "--world-samples", "2",
                                      "--world-seed", "5"], env=OFFLINE)
    assert result.exit_code == 0, result.output
    assert read_world_config(tmp_path / "w" / "world.json") == WorldConfig(num_samples=2, seed=5)
    assert (tmp_path / "w" / "vlm_world_mc.yaml").is_file()


def test_lmms_eval_runs_semclip_with_the_attention_scorer(saved):
    """lmms-eval's model arguments take SemClip with no weights at all: the base's own attention picks the crop."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vlm_adapters.adapters.semclip import SemClip

    calls = []
    original = SemClip.attention_maps
    with pytest.MonkeyPatch.context() as env:
        for key, value in {**OFFLINE, "HF_DATASETS_CACHE": str(saved / "cache")}.items():
            env.setenv(key, value)
        env.setattr(SemClip, "attention_maps", lambda self, *a: calls.append(1) or original(self, *a))
        manager = TaskManager("ERROR", include_path=str(saved / "world"), include_defaults=False)
        out = simple_evaluate(model="vlm_adapters", model_args=f'pretrained={saved / "base"},semclip={{"scorer":"attention"}}',
                              tasks=["vlm_world"], task_manager=manager, batch_size=2, verbosity="ERROR")
    assert 0.0 <= out["results"]["vlm_world"]["accuracy,none"] <= 1.0 and calls  # the attention chose the crops
    tuned, _ = load(plan(str(saved / "base"), None, {"scorer": "attention", "attention_layers": "calibrate"}))
    assert tuned.adapters["semclip"].scorer is None  # no CLIP built
