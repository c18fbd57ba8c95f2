"""`vlm-adapters inspect DIR`: what an adapter directory (or a run's latest checkpoint) holds."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from .common import user_errors


def tensor_summary(file: Path) -> dict[str, dict]:
    """Per key prefix (before the first dot): tensor count, parameters and bytes, from the
    safetensors header only (read with json and struct: no tensor is read, torch is not imported)."""
    from vlm_adapters.errors import AdapterError
    from vlm_adapters.tensor_header import numel, read_header

    groups: dict[str, dict] = {}
    try:
        header = read_header(file)
    except (OSError, ValueError) as err:
        raise AdapterError(f"{file} is corrupt or cut short ({str(err).splitlines()[0]}); re-save it, or use an "
                           "earlier checkpoint") from None
    for key, entry in header.items():
        count, dtype = numel(entry["shape"]), entry.get("dtype")
        group = groups.setdefault(key.split(".")[0], {"tensors": 0, "parameters": 0, "bytes": 0, "dtypes": []})
        group["tensors"] += 1
        group["parameters"] += count
        group["bytes"] += entry["data_offsets"][1] - entry["data_offsets"][0]
        if dtype not in group["dtypes"]:
            group["dtypes"].append(dtype)
    return groups


def describe(path: Path) -> dict:
    from vlm_adapters.io import (LORA_CONFIG, LORA_DIR, LORA_WEIGHTS, PROJECTOR_FILE, WEIGHTS_NAME, read_config,
                                 read_lora_config)
    from vlm_adapters.train.checkpoint import STATE_FILE, read_state, resolve_adapter_dir

    directory = resolve_adapter_dir(path)
    meta = read_config(directory)
    groups = tensor_summary(_weights(directory, WEIGHTS_NAME))
    info = {
        "directory": str(directory),
        "library_version": meta.get("library_version"),
        "base_model": meta.get("base_model", {}),
        "provenance": meta.get("provenance"),  # command, time, versions (absent in older saves)
        "fingerprint": meta["fingerprint"],
        "adapters": [{"method": cfg.get("method"), "config": {k: v for k, v in cfg.items() if k != "method"},
                      **groups.get(cfg.get("method"), {"tensors": 0, "parameters": 0, "bytes": 0})}
                     for cfg in meta["adapters"]],
        "files": {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()},
    }
    if (directory / PROJECTOR_FILE).is_file():
        info["projector"] = _total(tensor_summary(directory / PROJECTOR_FILE))
    if (directory / LORA_DIR / LORA_WEIGHTS).is_file() or (directory / LORA_DIR / LORA_CONFIG).is_file():
        lora = read_lora_config(directory)
        info["lora"] = {"r": lora.get("r"), "alpha": lora.get("lora_alpha"),
                        "target_modules": lora.get("target_modules"),
                        **_total(tensor_summary(directory / LORA_DIR / LORA_WEIGHTS))}
    if (directory / "README.md").is_file():  # the model card (vlm_adapters.card)
        info["card"] = (directory / "README.md").read_text(encoding="utf-8", errors="replace")
    if (directory / STATE_FILE).is_file():
        state = read_state(directory)
        info["training"] = {k: state.get(k) for k in ("step", "total_steps", "epoch", "loss", "num_processes")}
    return info


def _weights(directory: Path, name: str) -> Path:
    """The adapter weights file; a clear error when it is missing (and only pickles are there)."""
    from vlm_adapters.errors import AdapterError

    if (directory / name).is_file():
        return directory / name
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
    if pickles:
        raise AdapterError(f"{directory} has no {name}, only {', '.join(pickles)} (pickle files, never loaded "
                           "here: unpickling can run code); convert them with safetensors.torch.save_file")
    raise AdapterError(f"{directory} has no {name}: the adapter directory is incomplete; re-save the adapters")


def _total(groups: dict) -> dict:
    return {k: sum(g[k] for g in groups.values()) for k in ("tensors", "parameters", "bytes")}


def inspect(
    path: Path = typer.Argument(..., help="An adapter directory, a checkpoint (run/checkpoints/step-6 or "
                                "step-00000006), or a training output directory (its latest checkpoint is shown)."),
    as_json: bool = typer.Option(False, "--json", help="Print the description as JSON instead of tables."),
) -> None:
    """Show the methods and their configs, tensor counts and sizes, the base model and its fingerprint."""
    from rich.console import Console
    from rich.table import Table

    with user_errors():
        info = describe(path)
    if as_json:
        typer.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    console = Console()
    base = info["base_model"]
    console.print(f"[bold]{info['directory']}[/]  (vlm_adapters {info['library_version']})", highlight=False)
    details = ", ".join(f"{k} {base[k]}" for k in ("dtype", "revision") if base.get(k))
    console.print(f"base model: {base.get('class')}  {base.get('name_or_path')}" + (f" ({details})" if details else ""),
                  highlight=False)
    if info["provenance"]:
        console.print(f"saved by: {info['provenance'].get('command')}  at {info['provenance'].get('time')}",
                      highlight=False)
    table = Table("method", "tensors", "parameters", "size", "config", title="one row per adapter method (and the projector / LoRA when they train)")
    for a in info["adapters"]:
        table.add_row(a["method"], str(a["tensors"]), f"{a['parameters']:,}", _size(a["bytes"]),
                      json.dumps(a["config"], sort_keys=True))
    for name in ("projector", "lora"):
        if name in info:
            extra = {k: v for k, v in info[name].items() if k not in ("tensors", "parameters", "bytes")}
            table.add_row(name, str(info[name]["tensors"]), f"{info[name]['parameters']:,}", _size(info[name]["bytes"]),
                          json.dumps(extra, sort_keys=True) if extra else "")
    console.print(table)
    fingerprint = Table("fingerprint", "value",
                        title="base fingerprint: the shapes of the base the adapters were built for")
    for key, value in sorted(info["fingerprint"].items()):
        fingerprint.add_row(key, json.dumps(value))
    console.print(fingerprint)
    if "training" in info:
        console.print("training: " + ", ".join(f"{k} {v}" for k, v in info["training"].items()), highlight=False)
    if "card" in info:
        from rich.markdown import Markdown
        from rich.rule import Rule

        console.print(Rule("model card (README.md)"))
        console.print(Markdown(info["card"].split("\n---\n", 1)[-1]))  # without its YAML front matter


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
