"""`vlm-adapters eval`: score a base or wrapped VLM on lmms-eval tasks (a thin front end to lmms-eval)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .big_base import ATTN_IMPLEMENTATION, DEVICE_MAP, OFFLOAD_FOLDER, QUANTIZATION, load_options
from .common import quiet_transformers, user_errors


def eval_cmd(
    tasks: str = typer.Option("", "--tasks", help="Comma-separated lmms-eval task names (e.g. vlm_world,mme)."),
    model: str = typer.Option(None, "--model", help="The base model: a hub id or local directory. Default: the "
                                                    "one the adapters were trained on."),
    adapters: Path = typer.Option(None, "--adapters", help="An adapter directory, or a training output directory "
                                  "(its latest checkpoint is used). Without it the base model is scored."),
    semclip: str = typer.Option(None, "--semclip", help="SemClip settings: 'true' for the defaults, or a JSON "
                                "object of SemClipConfig fields, e.g. '{\"top_k\": 2}'."),
    include_path: list[Path] = typer.Option([], "--include-path", help="A directory of task YAMLs (repeatable)."),
    export_world: Path = typer.Option(None, "--export-world", help="Write the synthetic fine-detail world task "
                                      "(vlm_world, vlm_world_mc) into this directory and include it."),
    world_config: Path = typer.Option(None, "--world-config", exists=True, dir_okay=False, help="The exported "
                                      "world's settings: a JSON file (an earlier export's world.json, a bench "
                                      "base's bench.json). Default: WorldConfig()."),
    world_samples: int = typer.Option(None, "--world-samples", min=1, help="Samples in the exported world "
                                      "(default: the config's num_samples)."),
    world_seed: int = typer.Option(None, "--world-seed", help="Seed of the exported world (default: the config's)."),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="Requests per forward pass."),
    limit: int = typer.Option(None, "--limit", min=1, help="Score only the first N documents of each task."),
    dtype: str = typer.Option("float32", "--dtype", help="Weights dtype: float32, bfloat16 or float16."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:1 ... or auto (cuda when available)."),
    output: Path = typer.Option(None, "--output", help="Write the results (and every sample's answer) to this "
                                "JSON file."),
    device_map: str = DEVICE_MAP,
    offload_folder: Path = OFFLOAD_FOLDER,
    quantization: str = QUANTIZATION,
    attn_implementation: str = ATTN_IMPLEMENTATION,
) -> None:
    """Score a model with lmms-eval: the same as `lmms-eval --model vlm_adapters --model_args ...`."""
    from vlm_adapters.errors import AdapterError
    from vlm_adapters.eval.load import plan
    from vlm_adapters.train.model import torch_dtype

    quiet_transformers()
    with user_errors():
        torch_dtype(dtype)
        options = load_options(device, device_map, offload_folder, quantization, attn_implementation)
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        if not names and export_world is None:
            raise AdapterError("give --tasks NAME[,NAME...] (and --export-world DIR for the local world task)")
        paths = [str(p) for p in include_path]
        for path in paths:
            if not Path(path).is_dir():
                raise AdapterError(f"--include-path {path}: not a directory")
        checked = plan(model, adapters, semclip) if names else None  # bad model/adapters: before any work
        _require_lmms_eval()
        if export_world is not None:
            from vlm_adapters.bench.world import WorldConfig
            from vlm_adapters.eval.export import export_world as export
            from vlm_adapters.eval.export import read_world_config

            world = read_world_config(world_config) if world_config else WorldConfig()
            export(export_world, world, n=world_samples, seed=world_seed)
            typer.echo(f"wrote the world task ({world_samples or world.num_samples} samples) to {export_world}",
                       err=True)
            paths.append(str(export_world))
        if not names:
            return
        big = {"device_map": options.device_map, "offload_folder": options.offload_folder,
               "quantization": options.quantization, "attn_implementation": options.attn_implementation}
        results = _evaluate(checked, names, paths, semclip, dtype, device, batch_size, limit, bool(output), big)
    from lmms_eval.utils import handle_non_serializable, make_table

    typer.echo(make_table(results))
    if output is not None:
        from vlm_adapters.atomic import atomic_write_text

        output.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(results, indent=2, default=handle_non_serializable)
        atomic_write_text(output, text)
        typer.echo(f"results: {output}", err=True)


def _require_lmms_eval() -> None:
    from vlm_adapters.errors import AdapterError

    try:
        import datasets  # noqa: F401
        import lmms_eval  # noqa: F401
    except ImportError as err:
        raise AdapterError(f"lmms-eval is not installed ({err}): pip install 'vlm-adapters[eval]'") from None


def _evaluate(checked, names, paths, semclip, dtype, device, batch_size, limit, log_samples, big: dict) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vlm_adapters.errors import AdapterError
    from vlm_adapters.eval.model import VLMAdapters
    from vlm_adapters.eval.task_data import check_task_datasets

    manager = TaskManager("ERROR", include_path=paths or None, include_defaults=False)
    if set(names) - set(manager.match_tasks(names)):  # not local: index lmms-eval's own tasks too
        manager = TaskManager("ERROR", include_path=paths or None)
    missing = sorted(set(names) - set(manager.match_tasks(names)))
    if missing:
        raise AdapterError(f"unknown tasks {missing}: see `lmms-eval tasks list`, or give --include-path DIR "
                           "(--export-world DIR for vlm_world)")
    check_task_datasets(manager, names)  # data neither local, cached nor downloadable: named before the model loads
    lm = VLMAdapters(pretrained=checked.pretrained, adapters=checked.adapters, semclip=semclip, dtype=dtype,
                     device=device, batch_size=batch_size, **big)
    # recorded before the run: lmms-eval frees lm.model at its end
    record = _provenance(lm, checked, names, paths, semclip, dtype, device, batch_size, limit)
    results = simple_evaluate(model=lm, tasks=names, task_manager=manager, batch_size=batch_size, limit=limit,
                              log_samples=log_samples, verbosity="ERROR")
    if results is None:
        raise AdapterError("lmms-eval returned no results")
    results["provenance"] = record
    return results


def _provenance(lm, checked, names, paths, semclip, dtype, device, batch_size, limit) -> dict:
    """Which model, adapters and settings were scored, by which command and library version."""
    from vlm_adapters.provenance import adapters_record, base_record, provenance, resolved
    from vlm_adapters.wrap import AdaptedModel

    base = lm.model.base_model if isinstance(lm.model, AdaptedModel) else lm.model
    settings = {"tasks": names, "include_path": [resolved(p) for p in paths], "semclip": semclip, "dtype": dtype,
                "device": str(lm.device), "device_option": device, "batch_size": batch_size, "limit": limit}
    return provenance(base=base_record(base), adapters=adapters_record(checked.adapters) if checked.adapters else None,
                      settings=settings)
