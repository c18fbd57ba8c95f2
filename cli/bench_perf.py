"""`vlm-adapters bench perf`: what each adapter costs against the unwrapped base (vlm_adapters.bench.perf)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .common import quiet_transformers, user_errors

GROUPS = {"mid": "llava-mid,qwen2_vl-mid,perception_lm-mid",
          "real": "llava-1.5-7b,qwen2-vl-2b,qwen2-vl-7b,plm-1b,plm-3b",
          "tiny": "tiny-llava,tiny-qwen2_vl,tiny-perception_lm"}


def perf(
    sizes: str = typer.Option("mid", help="Comma-separated model sizes (see vlm_adapters.bench.sizes), or a group: "
                              "mid (CPU), real (GPU: LLaVA-1.5-7B, Qwen2-VL-2B/7B, PLM-1B/3B), tiny."),
    methods: str = typer.Option("", help="Comma-separated setups (default: every one): TG-FOM, TG-DP, TG-DP k=1 "
                                "(sparse: the most relevant tile only), TG-DP k=1 psi (its tile chosen by SemClip's "
                                "scorer, stacked without crops), SemClip, TIE, TG-FOM+TG-DP, all (the four stacked)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("", help="float32, bfloat16 or float16 (default: float32 on the CPU, bfloat16 on CUDA)."),
    repeats: int = typer.Option(3, help="Timed rounds; medians (of each base/wrapped pair's ratio) are reported."),
    warmup: int = typer.Option(1, help="Untimed rounds first."),
    new_tokens: int = typer.Option(8, help="Tokens each generate produces (decode tok/s: all but the first)."),
    inference: bool = typer.Option(True, help="Time inference: each setup's prefill, decode, memory against the base."),
    labelling: bool = typer.Option(True, help="Time SemClip's oracle labelling: crop by crop vs batched with the "
                                   "shared prefix (samples/s and the ratio)."),
    train: bool = typer.Option(True, help="Also time adapter-only training vs full fine-tuning vs LoRA."),
    train_steps: int = typer.Option(2, help="Timed optimizer steps per training mode (after one warm-up)."),
    batch_size: int = typer.Option(1, help="Training batch size."),
    isolate: bool = typer.Option(True, help="Each training mode in a fresh process (honest peaks; slower start)."),
    flops_only: bool = typer.Option(False, help="Only count FLOPs, on the CPU, of two shallow copies of each size "
                                    "(real widths and inputs), extrapolated to its real depth: where the targets "
                                    "stand at real sizes without a GPU."),
    out: Path = typer.Option(None, help="Write the results as JSON here."),
    markdown_out: Path = typer.Option(None, "--markdown", help="Also write the markdown tables here."),
) -> None:
    """Prefill, decode tok/s, peak memory, SemClip tokens and scorer time, training step cost: wrapped vs base."""
    import torch

    from vlm_adapters.bench.perf import SETUPS, markdown, markdown_flops, run, scaled_flops
    from vlm_adapters.bench.sizes import SIZES
    from vlm_adapters.errors import AdapterError
    from vlm_adapters.io import atomic_write
    from vlm_adapters.provenance import provenance
    from vlm_adapters.train.model import torch_dtype

    quiet_transformers()
    with user_errors():
        names = [s.strip() for s in GROUPS.get(sizes, sizes).split(",") if s.strip()]
        unknown = [n for n in names if n not in SIZES]
        if unknown:
            raise AdapterError(f"--sizes: unknown {unknown}; choose from {sorted(SIZES)} or {sorted(GROUPS)}")
        chosen = SETUPS if not methods else tuple(m.strip() for m in methods.split(","))
        if set(chosen) - set(SETUPS):
            raise AdapterError(f"--methods: unknown {sorted(set(chosen) - set(SETUPS))}; choose from {SETUPS}")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise AdapterError("--device cuda: no CUDA device here; use --device cpu")
        dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
        torch_dtype(dtype)
        if min(repeats, new_tokens, train_steps, batch_size) < 1 or warmup < 0:
            raise AdapterError("--repeats, --new-tokens, --train-steps and --batch-size must be >= 1, --warmup >= 0")
        settings = {"sizes": names, "methods": list(chosen), "device": device, "dtype": dtype, "repeats": repeats,
                    "warmup": warmup, "new_tokens": new_tokens, "inference": inference, "labelling": labelling, "train": train, "train_steps": train_steps,
                    "batch_size": batch_size, "isolate": isolate, "flops_only": flops_only}
        record = provenance(base={"random_init_sizes": names}, settings=settings)  # no pretrained weights

        def save(results) -> None:  # after each size, so that a long run keeps what it measured
            table = markdown_flops(results) if flops_only else markdown(results)
            saved = {"provenance": record, **results}
            for path, text in ((out, json.dumps(saved, indent=2)), (markdown_out, table)):
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text))
            return table

        progress = lambda msg: typer.echo(msg, err=True)  # noqa: E731
        if flops_only:
            results = {}
            for name in names:
                results[name] = scaled_flops(name, names=chosen, progress=progress)
                save(results)
        else:
            results = run(names, names=chosen, repeats=repeats, warmup=warmup, new_tokens=new_tokens, train=train,
                          inference=inference, labelling=labelling,
                          train_steps=train_steps, batch_size=batch_size, device=dev, dtype=torch_dtype(dtype),
                          isolate=isolate, progress=progress, on_size=save)
    typer.echo(save(results))
