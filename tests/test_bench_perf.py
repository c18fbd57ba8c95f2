"""`bench perf`: runs end to end on a tiny model (numbers not asserted); adapters work only in prefill."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import vlm_adapters as va
from vlm_adapters.bench.perf import SETUPS, adapter_calls_by_step, count_flops, model_inputs, scaled_flops, setups
from vlm_adapters.bench.sizes import build
from vlm_adapters.cli.main import app
from vlm_adapters.tiny import FAMILIES

CASES = [("tiny-llava", s) for s in SETUPS] + [(f"tiny-{f}", "all") for f in FAMILIES if f != "llava"]


@pytest.mark.parametrize("size,setup", CASES)
def test_adapters_work_only_in_prefill(size, setup):
    model, processor, image = build(size)
    wrapped = va.wrap(model, *setups(size)[setup], processor=processor)
    extra = {"images": [image]} if "semclip" in wrapped.adapters else {}
    calls = adapter_calls_by_step(wrapped, model_inputs(processor, image, "cpu", torch.float32), new_tokens=4, **extra)
    assert calls.pop("lm_forwards") == 4  # the prefill and 3 decode steps
    assert calls[0] > 0, "no adapter ran in the prefill"
    assert set(calls) == {0}, f"adapter or vision work in decode steps: {dict(calls)}"


def test_bench_perf_end_to_end(tmp_path):
    out, table = tmp_path / "perf.json", tmp_path / "perf.md"
    result = CliRunner().invoke(app, [
        "bench", "perf", "--sizes", "tiny-llava", "--methods", "all", "--repeats", "1", "--warmup", "0",
        "--new-tokens", "2", "--train-steps", "1", "--no-isolate", "--out", str(out), "--markdown", str(table)])
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["provenance"]["settings"]["sizes"] == ["tiny-llava"] and saved["provenance"]["library_version"]
    one = saved["sizes"]["tiny-llava"]
    assert set(one["inference"]["setups"]) == {"base", "all"}
    for row in one["inference"]["setups"].values():
        assert row["prefill_ms"] > 0 and row["decode_tok_s"] > 0 and row["vision_calls"] >= 1
    assert one["inference"]["setups"]["all"]["scorer_ms"] > 0  # SemClip's scorer ran, inside the stack
    tokens = one["inference"]["semclip_tokens"]
    assert tokens["k=1"]["all_crops_2x2"] == 5 * tokens["k=1"]["overview"]  # overview + 4 tiles, fixed-size family
    assert tokens["k=2"]["crops"] == 2 * tokens["k=1"]["crops"]
    assert set(one["training"]) == {"full", "lora", "all"}
    assert one["training"]["lora"]["trainable_parameters"] < one["training"]["full"]["trainable_parameters"]
    assert "vs_full" in one["training"]["lora"] and one["targets"]
    assert "| all |" in table.read_text() and "| target |" in table.read_text()


def test_flops_extrapolated_in_depth_match_a_direct_count():
    """scaled_flops counts two shallow copies and extrapolates; at tiny-llava's own depth (2 vision,
    2 text layers) the line must give what counting the model itself gives."""
    scaled = scaled_flops("tiny-llava", names=("TIE",), depths=((3, 1), (4, 3)))["setups"]
    model, processor, image = build("tiny-llava")
    inputs = model_inputs(processor, image, "cpu", torch.float32)
    wrapped = va.wrap(model, *setups("tiny-llava")["TIE"], processor=processor)
    for name, runner in (("TIE", wrapped), ("base", model)):
        direct = count_flops(runner, model, inputs)
        for key in ("prefill_gflop", "vision_gflop", "decode_gflop"):
            assert scaled[name][key] == pytest.approx(direct[key], rel=1e-6), (name, key)
        model = wrapped.unwrap() if runner is wrapped else model
    assert scaled["TIE"]["flop_ratios"]["vision"] > 1  # TIE's injection runs inside the vision tower


def test_bench_perf_bad_options():
    result = CliRunner().invoke(app, ["bench", "perf", "--sizes", "huge", "--no-train"])
    assert result.exit_code == 2 and "unknown" in result.output
    result = CliRunner().invoke(app, ["bench", "perf", "--sizes", "tiny-llava", "--methods", "LoRA"])
    assert result.exit_code == 2 and "--methods" in result.output


def test_timers_stand_alone():
    """`vlm-adapters tie bench` imports the timers only: they must not pull in the benchmark runs."""
    code = ("import sys, vlm_adapters.bench.perf_timers; "
            "print(sorted(m for m in sys.modules if m.startswith('vlm_adapters.bench.perf')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['vlm_adapters.bench.perf_timers']"
