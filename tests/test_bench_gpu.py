"""`bench gpu --tiny`: the GPU check's code path on the CPU, every family, so that it never rots."""

from __future__ import annotations

import json

from typer.testing import CliRunner
from vlm_adapters.cli.main import app

from vlm_adapters.bench import gpu


def test_bench_gpu_tiny_every_family(tmp_path):
    out, table = tmp_path / "gpu.json", tmp_path / "gpu.md"
    result = CliRunner().invoke(app, ["bench", "gpu", "--tiny", "--out", str(out), "--markdown", str(table)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    failed = [r for r in rows if r["status"] == "failed"]
    assert not failed, failed
    families = {r["size"] for r in rows if r["status"] == "ok"}
    assert families == set(gpu.tiny_sizes()) and len(families) >= 10
    for r in rows:
        if r["status"] == "ok" and r["method"] != "oracle":
            assert r["forward_ms"] > 0 and r["generate_ms"] > 0 and r["step_ms"] > 0 and r["peak_mb"] > 0, r
    methods = {r["method"] for r in rows if r["size"] == "tiny-llava"}
    assert methods == {"TG-FOM", "TG-DP", "SemClip", "TIE", "oracle"}
    quantized = [r for r in rows if r["bits"] in (4, 8)]
    assert {(r["size"], r["bits"], r["method"]) for r in quantized} == {
        (s, b, m) for s in ("tiny-llava", "tiny-qwen2_vl") for b in (4, 8) for m in ("TG-FOM", "TIE")}
    assert all(r["status"] == "skipped" and "bitsandbytes" in r["error"] for r in quantized)  # no CUDA here
    assert "| tiny-qwen2_vl | sdpa | 32 | TIE | ok |" in table.read_text()


def test_a_failing_row_records_its_error_and_the_check_goes_on(monkeypatch):
    real_build = gpu.build

    def build(size, **kw):
        if size == "tiny-gemma3":
            raise RuntimeError("CUDA error: no kernel image\nsecond line")
        return real_build(size, **kw)

    def step(*args):
        raise FloatingPointError("training loss is nan")

    monkeypatch.setattr(gpu, "build", build)
    monkeypatch.setattr(gpu, "_step", step)
    results = gpu.run(["tiny-gemma3", "tiny-llava"], methods=("TG-FOM", "TIE"), quantized=False, oracle=False)
    rows = {(r["size"], r["method"]): r for r in results["rows"]}
    assert rows["tiny-gemma3", "build"] == rows["tiny-gemma3", "build"] | {
        "status": "failed", "error": "RuntimeError: CUDA error: no kernel image"}
    for method in ("TG-FOM", "TIE"):  # every method of the next size still ran, each failing on its own
        assert rows["tiny-llava", method]["status"] == "failed"
        assert rows["tiny-llava", method]["error"] == "FloatingPointError: training loss is nan"
    assert "| tiny-gemma3 | sdpa | 32 | build | failed |" in gpu.markdown(results)


def test_the_time_budget_skips_what_is_left():
    results = gpu.run(["tiny-llava", "tiny-qwen2_vl"], methods=("TIE",), quantized=False, budget_s=0)
    assert [(r["size"], r["status"]) for r in results["rows"]] == [("tiny-llava", "skipped"), ("tiny-qwen2_vl", "skipped")]


def test_bench_gpu_bad_options():
    result = CliRunner().invoke(app, ["bench", "gpu", "--tiny", "--sizes", "huge"])
    assert result.exit_code == 2 and "unknown" in result.output
    result = CliRunner().invoke(app, ["bench", "gpu", "--tiny", "--methods", "LoRA"])
    assert result.exit_code == 2 and "--methods" in result.output
