"""Reports: where the issue's targets stand, and the results as markdown tables."""

from __future__ import annotations

from .perf_setups import SETUPS, TRAIN_BASELINES

TARGETS = (  # (target, setup, key in "ratios" and "flop_ratios", limit, "max"|"min")
    ("TG-FOM prefill <= 1.03x base", "TG-FOM", "prefill", 1.03, "max"),
    ("TIE vision + prefill <= 1.10x base", "TIE", "prefill", 1.10, "max"),
    ("TG-DP vision tower + perceiver <= 1.5x base vision", "TG-DP", "vision_side", 1.5, "max"),
    ("sparse TG-DP (k=1) vision tower <= 2x base vision", "TG-DP k=1", "vision", 2.0, "max"),
    ("sparse TG-DP (k=1), SemClip's scorer choosing: tower + scorer <= 2x base vision", "TG-DP k=1 psi",
     "vision_scorer", 2.0, "max"),
    ("SemClip scorer <= 0.10x base prefill", "SemClip", "scorer_over_prefill", 0.10, "max"),
) + tuple((f"{s} decode tok/s >= 0.97x base", s, "decode", 0.97, "min") for s in SETUPS)


def targets(result: dict) -> list[dict]:
    """Where each of the issue's targets stands in one size's results: measured in time and, for
    the prefill-side ones, in FLOPs (exact, unaffected by other work on the machine)."""
    out = []
    inference, training = result.get("inference"), result.get("training")

    def add(name, value, flops, limit, kind):
        ok = (lambda v: v is not None and (v <= limit if kind == "max" else v >= limit))
        out.append({"target": name, "value": value, "flops": flops, "met": ok(value),
                    "met_flops": ok(flops) if flops is not None else None})

    if inference:
        for name, setup, key, limit, kind in TARGETS:
            if setup in inference["setups"]:
                row = inference["setups"][setup]
                add(name, row["ratios"][key], row["flop_ratios"].get(key), limit, kind)
        k1 = inference["semclip_tokens"]["k=1"]["fraction"]
        add("SemClip k=1 tokens <= 0.45x 2x2 all-crops", k1, None, 0.45, "max")
    if result.get("labelling"):
        add("SemClip oracle labelling >= 3x crop by crop", result["labelling"]["ratio"], None, 3.0, "min")
    if training:
        for mode, row in training.items():
            if mode not in TRAIN_BASELINES and "vs_full" in row:
                vs = row["vs_full"]
                add(f"{mode} training peak (model + training) <= 0.5x full", vs.get("model_peak_mb", vs["peak_mb"]),
                    None, 0.5, "max")
    return out


def markdown(results: dict) -> str:
    """The results as markdown tables, one group per size."""
    lines = [f"torch {results['torch']}, {results.get('gpu', results['device'])}, {results['dtype']}, "
             f"{results['threads']} threads; median of {results['repeats']} paired runs after {results['warmup']} "
             f"warm-up round(s); {results['new_tokens']} new tokens per generate", ""]
    for size, one in results["sizes"].items():
        inf = one.get("inference")
        lines += [f"### {size}" + (f" ({inf['prompt_tokens']} prompt tokens)" if inf else ""), ""]
        if one.get("labelling"):
            lab = one["labelling"]
            lines += ["Rows: the two ways the oracle scores every candidate crop of a sample with the frozen VLM.", "",
                      "| SemClip oracle labelling | candidates | s / sample | samples/s | x crop by crop |",
                      "|---|---|---|---|---|",
                      f"| crop by crop (a whole forward per crop) | {lab['candidates']} | {lab['crop_by_crop_s']:.3f} | "
                      f"{lab['samples_per_s']['crop_by_crop']:.3g} | 1.00x |",
                      f"| batched (one vision call, {'shared prefix' if lab['shared_prefix'] else 'whole prompts'}) | "
                      f"{lab['candidates']} | {lab['batched_s']:.3f} | {lab['samples_per_s']['batched']:.3g} | "
                      f"{_x(lab['ratio'])} |", "", f"Largest log-likelihood difference between the two ways: "
                      f"{lab['max_loglik_difference']:.2g}.", ""]
        if inf is None:
            lines += _target_lines(one)
            continue
        lines += ["Rows: the unwrapped base, then each wrapped setup on the same prompt; x base: the setup's value "
                  "over the base's, paired in the same run.", "",
                  "| setup | prefill ms | x base | vision ms | x base | decode tok/s | x base | peak MB | x base "
                  "| prefill GFLOP | x base | vision GFLOP | x base |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, row in inf["setups"].items():
            r, f = row.get("ratios", {}), row.get("flop_ratios", {})
            cells = [f"{row['prefill_ms']:.0f}", _x(r.get("prefill")), f"{row['vision_ms']:.0f}", _x(r.get("vision")),
                     f"{row['decode_tok_s']:.1f}", _x(r.get("decode")), f"{row['peak_mb']:.0f}", _x(r.get("peak")),
                     f"{row['prefill_gflop']:.1f}", _x(f.get("prefill")), f"{row['vision_gflop']:.1f}", _x(f.get("vision"))]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if "SemClip" in inf["setups"]:
            r = inf["setups"]["SemClip"]
            lines += ["", f"SemClip scorer: {r['scorer_ms']:.0f} ms = {r['ratios']['scorer_over_prefill']:.2f}x the "
                      f"base prefill time ({r['scorer_gflop']:.1f} GFLOP = "
                      f"{r['flop_ratios']['scorer_over_prefill']:.2f}x its FLOPs)."]
        lines += ["", "Rows: SemClip with k crops: the visual tokens it gives the LLM, against the overview plus all "
                  "four crops of a 2x2 grid.", "", "| SemClip | overview | crops | visual tokens | all 4 crops of 2x2 + overview | fraction |",
                  "|---|---|---|---|---|---|"]
        for k, t in inf["semclip_tokens"].items():
            lines.append(f"| {k} | {t['overview']} | {t['crops']} | {t['used']} | {t['all_crops_2x2']} | "
                         f"{t['fraction']:.2f} |")
        if one.get("training"):
            lines += ["", "Rows: one training step each way (full fine-tuning, LoRA on the LLM, the adapters); x full "
                      "and x LoRA: over full fine-tuning's and LoRA's.", "", "| training | trainable M | step s | x full | x LoRA | step GFLOP | x full | x LoRA | "
                      "peak MB (process) | x full | model + training MB | x full | x LoRA |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for mode, row in one["training"].items():
                if "error" in row:
                    lines.append(f"| {mode} | {row['error']} |" + " |" * 11)
                    continue
                vf, vl = row.get("vs_full", {}), row.get("vs_lora", {})
                cells = [f"{row['trainable_parameters'] / 1e6:.2f}", f"{row['step_s']:.2f}", _x(vf.get("step_s")),
                         _x(vl.get("step_s")), _num(row.get("step_gflop"), ".1f"), _x(vf.get("step_gflop")),
                         _x(vl.get("step_gflop")), f"{row['peak_mb']:.0f}", _x(vf.get("peak_mb")),
                         _num(row.get("model_peak_mb"), ".0f"), _x(vf.get("model_peak_mb")), _x(vl.get("model_peak_mb"))]
                lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        lines += [""] + _target_lines(one)
    return "\n".join(lines)


def _target_lines(one: dict) -> list[str]:
    return ["Rows: the project's cost targets, each against its measured ratio and the same ratio in FLOPs.", "",
            "| target | measured (time, memory, tokens) | met | in FLOPs | met |", "|---|---|---|---|---|"] + [
        f"| {t['target']} | {t['value']:.3f} | {_yes(t['met'])} | {_num(t['flops'])} | {_yes(t['met_flops'])} |"
        for t in one["targets"]] + [""]


def markdown_flops(results: dict) -> str:
    """scaled_flops results (one per size) as markdown: FLOPs and where the prefill-side targets stand."""
    lines = []
    for size, one in results.items():
        (v1, t1), (v2, t2) = one["measured_at"]
        lines += [f"### {size}: FLOPs at {one['layers'][0]} vision / {one['layers'][1]} text layers "
                  f"(counted at {v1}/{t1} and {v2}/{t2}, extrapolated in depth)", "",
                  "Rows: the base, then each wrapped setup, counted in FLOPs at real depth.", "",
                  "| setup | prefill TFLOP | x base | vision TFLOP | x base | vision + TG-DP x base vision | "
                  "scorer / base prefill | decode step GFLOP | base / setup |", "|---|---|---|---|---|---|---|---|---|"]
        for name, row in one["setups"].items():
            f = row.get("flop_ratios", {})
            cells = [f"{row['prefill_gflop'] / 1e3:.2f}", _x(f.get("prefill")), f"{row['vision_gflop'] / 1e3:.3f}",
                     _x(f.get("vision")), _x(f.get("vision_side")), _num(f.get("scorer_over_prefill")),
                     f"{row['decode_gflop']:.1f}", _x(f.get("decode"))]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "Rows: the prefill-side cost targets, in FLOPs.", "", "| target | in FLOPs | met |", "|---|---|---|"]
        for name, setup, key, limit, kind in TARGETS:
            if setup in one["setups"]:
                value = one["setups"][setup]["flop_ratios"][key]
                lines.append(f"| {name} | {value:.3f} | {_yes(value <= limit if kind == 'max' else value >= limit)} |")
        lines.append("")
    return "\n".join(lines)


def _yes(met) -> str:
    return "" if met is None else ("yes" if met else "no")


def _num(value, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def _x(value) -> str:
    return "" if value is None or value != value else f"{value:.2f}x"
