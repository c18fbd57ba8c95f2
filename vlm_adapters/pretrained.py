"""peft's save and load habits on the wrapper: save_pretrained, push_to_hub, from_pretrained.

Only adapters are written or uploaded, never the base. As peft lays them out, the `default` set is
the directory itself and every other named set a subdirectory of its name. A save writes the whole
directory at once (staged, then swapped in): it holds exactly the sets saved, never a set or a
projector left from an earlier save, and a kill leaves the old directory or the new one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import AdapterError, shorten

SAVED_FILES = ["adapter_config.json", "adapter_model.safetensors", "projector.safetensors", "lora/*"]


def set_directory(root, name: str) -> Path:
    """Where the set `name` goes under `root`: the root itself for `default` (peft's layout)."""
    from .wrap import DEFAULT_ADAPTER

    return Path(root) if name == DEFAULT_ADAPTER else Path(root) / name


def save_pretrained(wrapped, save_directory, selected_adapters=None, *, is_main_process: bool = True,
                    safe_serialization: bool = True, **unknown) -> None:
    if unknown:
        raise AdapterError(f"save_pretrained: {sorted(unknown)} not supported here (it writes adapters only: "
                           "save_pretrained(dir, selected_adapters=[...]))")
    if not safe_serialization:
        raise AdapterError("save_pretrained(safe_serialization=False): adapters are only saved as safetensors")
    names = list(wrapped.adapter_names if selected_adapters is None else selected_adapters)
    for name in names:
        wrapped._require_set(name)
    if not is_main_process:
        return
    from .atomic import write_dir
    from .io import keep_foreign
    from .train.model import save_trainable

    root = Path(save_directory)
    if root.exists() and not root.is_dir():
        raise AdapterError(f"{root} is a file: save_pretrained writes a directory; choose another path")

    def build(staging: Path) -> None:
        for name in names:  # with a trained projector or LoRA (shared by the sets) beside each set's adapters
            with wrapped.using_adapter(name):
                target = set_directory(staging, name)
                target.mkdir(exist_ok=True)
                save_trainable(wrapped, target)

    write_dir(root, build, keep_others=keep_foreign)  # every set in one staged directory, swapped in whole


def push_to_hub(wrapped, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload adapters with vlm_adapters", revision: str | None = None,
                selected_adapters=None):
    """Save the adapters to a temporary directory and upload it (create the repo if needed)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(wrapped, tmp, selected_adapters)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message,
                                 revision=revision)


def adapter_source(model_id, revision: str | None = None, token: str | None = None) -> Path:
    """A local directory for `model_id`: itself, a training output's latest checkpoint, or a Hub
    repo's adapter files downloaded (or found in the cache). `run/checkpoints/step-6` names
    `step-00000006`."""
    from .train.checkpoint import resolve_adapter_dir, step_dir_alias

    path = step_dir_alias(Path(model_id))
    if path.is_dir():

        return resolve_adapter_dir(path) if not (path / "adapter_config.json").is_file() and \
            (path / "checkpoints").is_dir() else path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model_id), revision=revision, token=token, allow_patterns=SAVED_FILES))
    except Exception as err:  # hub errors are many types (validation, offline, not found, auth)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise AdapterError(f"{shorten(model_id)} is neither an adapter directory nor a reachable Hub repo ({first})") from None


def from_pretrained(model, model_id, adapter_name: str, *, processor=None, revision=None, token=None):
    """Everything saved at `model_id` (adapters, and a trained projector or LoRA) on top of `model`."""
    from .train.model import load_trained

    return load_trained(model, adapter_source(model_id, revision, token), processor, adapter_name=adapter_name)
