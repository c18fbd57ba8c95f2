"""Where each lmms-eval task's data comes from, read from its YAML alone (no `!function` imported, nothing
downloaded), so `vlm-adapters eval` names the tasks whose data cannot be had before it loads a model.

lmms-eval 0.7.3 (`ConfigurableTask.download`) loads a task's data with `datasets.load_dataset(dataset_path,
dataset_name, cache_dir=<its datasets cache>, **dataset_kwargs)`, or `datasets.load_from_disk(dataset_path)`
when `dataset_kwargs.load_from_disk`; `dataset_path` is a hub dataset id, a local directory, or a generic
builder (parquet, json, ...) whose `data_files` it resolves against the YAML's directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import shorten
from ..hub import NotAvailable, datasets_offline, hub_reachable, no_network, offline_reason, set_offline

LOCAL_BUILDERS = ("csv", "json", "parquet", "text", "pandas", "arrow")  # lmms_eval.utils._LOCAL_BUILDERS
URL_PREFIXES = ("http://", "https://", "s3://", "gs://", "ftp://", "ftps://")


def task_configs(manager, names: list[str]) -> dict[str, dict | None]:
    """{task: its YAML config} of every task that `names` (tasks, groups, tags) runs; None for a Python
    task (its data is known only to its class)."""
    from lmms_eval.utils import load_yaml_config

    index, out = manager.task_index, {}

    def config_of(name: str) -> dict:
        return load_yaml_config(index[name]["yaml_path"], mode="simple")

    def visit(entry, overrides: dict | None = None) -> None:
        if isinstance(entry, dict):
            entry = dict(entry)
            if "group" in entry and "task" in entry:  # an inline group
                for sub in entry["task"]:
                    visit(sub)
                return
            name = entry.pop("task", None)
            if isinstance(name, str) and name in index:
                visit(name, {**(overrides or {}), **entry})
            elif isinstance(name, str):  # a task defined inline in its group
                out[name] = {**entry, **(overrides or {})}
            return
        info = index.get(entry)
        if info is None:
            return  # unknown names are reported by the caller
        if info["type"] == "python_task":
            out[entry] = None
        elif info["type"] == "task":
            out[entry] = {**config_of(entry), **(overrides or {})}
        elif info["type"] == "tag" or info.get("task", -1) != -1:
            for sub in info["task"]:
                visit(sub, overrides)
        else:  # a group with its own YAML
            for sub in config_of(entry).get("task", []):
                visit(sub, overrides)

    for name in names:
        visit(name)
    return out


def unavailable(config: dict, cache_dir: str) -> str | None:
    """Why this task's data cannot be had now (a short phrase; DOWNLOAD marks one that needs the network),
    or None when it can."""
    path = config.get("dataset_path")
    kwargs = config.get("dataset_kwargs") or {}
    if not isinstance(path, str) or not path:
        return None
    if kwargs.get("load_from_disk") or os.path.isdir(path):
        return None if os.path.isdir(path) else f"directory {path} not found"
    if path in LOCAL_BUILDERS:
        files = _flatten(kwargs.get("data_files"))
        missing = [f for f in files if not f.startswith(URL_PREFIXES) and not Path(f).is_file()]
        if missing:
            return f"data file {missing[0]} not found"
        urls = [f for f in files if f.startswith(URL_PREFIXES)]
        return _no_download(f"data files at {urls[0]}") if urls else None
    repo = path.removeprefix("hf://datasets/")
    if dataset_cached(repo, cache_dir):
        if not datasets_offline() and not hub_reachable():
            set_offline(no_network())  # load it from the cache at once, with no retries
        return None
    return _no_download(f"hub dataset {shorten(repo)}, not in the datasets cache {cache_dir}")


DOWNLOAD = " [download]"


def _no_download(what: str) -> str | None:
    if not datasets_offline():
        if hub_reachable():
            return None  # it will be downloaded
        set_offline(no_network())
    return what + DOWNLOAD


def dataset_cached(repo: str, cache_dir: str) -> bool:
    """`datasets` would load hub dataset `repo` from `cache_dir` offline (its own cache lookup)."""
    from datasets.load import CachedDatasetModuleFactory

    try:
        CachedDatasetModuleFactory(repo, cache_dir=cache_dir).get_module()
    except (FileNotFoundError, AssertionError):
        return False
    return True


def datasets_cache() -> str:
    """The datasets cache lmms-eval loads from: LMMS_EVAL_DATASETS_CACHE, else HF_DATASETS_CACHE, else
    HF_HOME/datasets (on a remote filesystem lmms-eval may pick a node-local copy: asked of it)."""
    try:
        from lmms_eval.api.task import _resolve_hf_datasets_cache_dir

        return _resolve_hf_datasets_cache_dir()
    except (ImportError, OSError):
        import datasets.config

        return str(datasets.config.HF_DATASETS_CACHE)


def check_task_datasets(manager, names: list[str]) -> None:
    """`NotAvailable` naming every task of `names` whose data is neither local, cached nor downloadable now."""
    cache_dir = datasets_cache()
    problems = {task: why for task, config in task_configs(manager, names).items()
                if config is not None and (why := unavailable(config, cache_dir))}
    if not problems:
        return
    listed = "; ".join(f"{task} ({why.removesuffix(DOWNLOAD)})" for task, why in problems.items())
    downloads = [task for task, why in problems.items() if why.endswith(DOWNLOAD)]
    if not downloads:
        raise NotAvailable(f"the data of {len(problems)} task(s) is missing: {listed}; check the task YAMLs' "
                           "dataset_path and data_files (relative paths are read beside the YAML)")
    tasks = ", ".join(repr(t) for t in downloads)
    raise NotAvailable(f"the data of {len(problems)} task(s) is not available: {listed}; and {offline_reason()}. On "
                       "a connected machine with the same HF_HOME run `python -c \"from lmms_eval.tasks import "
                       f"TaskManager, get_task_dict; get_task_dict([{tasks}], TaskManager())\"` (it downloads the "
                       "tasks' data) and copy HF_HOME here, or evaluate local tasks (--include-path DIR, "
                       "--export-world DIR)")


def _flatten(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [f for v in value for f in _flatten(v)]
    return []
