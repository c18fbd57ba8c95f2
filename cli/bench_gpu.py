"""`vlm-adapters bench gpu`: every family and method on a GPU in bf16, flash-attention and 4/8-bit
(vlm_adapters.bench.gpu); `--tiny` runs the same code on the tiny models, on any machine."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .common import quiet_transformers, user_errors


def gpu(
    tiny: bool = typer.Option(False, "--tiny", help="The tiny model of each family instead of its real size (runs "
                              "on the CPU in seconds; the suite's test of this check)."),
    sizes: str = typer.Option("", help="Comma-separated sizes (default: every real size, or with --tiny every "
                              "family's tiny model)."),
    methods: str = typer.Option("", help="Comma-separated methods (default: TG-FOM,TG-DP,SemClip,TIE)."),
    device: str = typer.Option("", help="cuda, cuda:N or cpu (default: cuda when there is one)."),
    quantized: bool = typer.Option(True, help="Also LLaVA-1.5-7B and Qwen2-VL-7B shapes in 4-bit and 8-bit "
                                   "(bitsandbytes) with TG-FOM and TIE."),
    budget: float = typer.Option(480, help="Seconds: once spent, the sizes not begun are recorded as skipped."),
    out: Path = typer.Option(Path("bench-gpu.json"), help="The rows as JSON (written after each size)."),
    markdown_out: Path = typer.Option(Path("bench-gpu.md"), "--markdown", help="The rows as a markdown table."),
) -> None:
    """Check every family and method on a GPU: bf16, sdpa and flash-attention, 4/8-bit bases.

    Per family x method x attention kernel: a forward with labels, generate of 8 tokens and one
    adapter-only step; SemClip's batched oracle; 4/8-bit bases. A failing row records its error and
    the check goes on."""
    import torch

    from vlm_adapters.atomic import atomic_write_text
    from vlm_adapters.bench import gpu as check
    from vlm_adapters.errors import AdapterError
    from vlm_adapters.families import REAL, SIZES

    quiet_transformers()
    with user_errors():
        names = [s.strip() for s in sizes.split(",") if s.strip()] or list(check.tiny_sizes() if tiny else REAL)
        if unknown := [n for n in names if n not in SIZES]:
            raise AdapterError(f"--sizes: unknown {unknown}; choose from {sorted(SIZES)}")
        chosen = [m.strip() for m in methods.split(",") if m.strip()] or list(check.METHODS)
        if bad := sorted(set(chosen) - set(check.METHODS)):
            raise AdapterError(f"--methods: unknown {bad}; choose from {', '.join(check.METHODS)}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise AdapterError("--device cuda: no CUDA device here; use --device cpu (with --tiny)")

        def save(results) -> None:
            atomic_write_text(out, json.dumps(results, indent=1))
            atomic_write_text(markdown_out, check.markdown(results))

        results = check.run(names, tiny=tiny, device=device or None, methods=chosen, quantized=quantized,
                            budget_s=budget, echo=lambda msg: typer.echo(msg, err=True), on_size=save)
        save(results)
        typer.echo(check.markdown(results))
