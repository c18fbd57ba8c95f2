"""Offline and cluster use: where a model, a text tower or a dataset comes from, and one line when it cannot be had.

- `HF_HUB_OFFLINE=1` / `HF_DATASETS_OFFLINE=1` (or `vlm-adapters --offline`, which calls `set_offline()`):
  never reach the network; local directories and the Hugging Face cache only.
- Otherwise a name that is neither a local directory nor cached costs one probe of the hub: a HEAD
  request to HF_ENDPOINT through huggingface_hub's session (so through its proxy), at most
  PROBE_TIMEOUT seconds, once per process. When it fails the process goes offline (`set_offline`):
  cached files then load without a retry, and what is missing fails at once with `NotAvailable`,
  which says what was missing, where it was looked for and how to get it.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from pathlib import Path
from urllib.parse import urlparse

from .errors import AdapterError, shorten

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
PROBE_TIMEOUT = 2.0  # seconds; DNS lookup included
_TRUE = {"1", "ON", "YES", "TRUE"}


class NotAvailable(AdapterError):
    """A model, text tower or dataset is neither local nor cached, and cannot be downloaded now."""


def _true(name: str) -> bool:
    return os.environ.get(name, "").upper() in _TRUE


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: models and text towers come from the cache only."""
    return _true("HF_HUB_OFFLINE") or _true("TRANSFORMERS_OFFLINE")


def datasets_offline() -> bool:
    """HF_DATASETS_OFFLINE is set, or unset with HF_HUB_OFFLINE set (as `datasets` reads them)."""
    return _true("HF_DATASETS_OFFLINE") if "HF_DATASETS_OFFLINE" in os.environ else hub_offline()


_reason: list[str] = []  # why this process went offline, when it was not the user's variables


def set_offline(reason: str = "") -> None:
    """Offline from now on, for this process and its children: the variables, and the copies that
    huggingface_hub and datasets took of them at import (if they are imported already). `reason`
    (e.g. "--offline") is what later errors give as the cause."""
    if reason and not hub_offline():
        _reason[:] = [reason]
    for name in OFFLINE_VARS:
        os.environ[name] = "1"
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    if "datasets.config" in sys.modules:
        config = sys.modules["datasets.config"]
        config.HF_HUB_OFFLINE = config.HF_DATASETS_OFFLINE = True


# -- the network, probed once ----------------------------------------------------------------------
def hub_address() -> tuple[str, int]:
    """(host, port) a download connects to first: the proxy for HF_ENDPOINT's scheme if one applies,
    else HF_ENDPOINT's own host."""
    from urllib.request import getproxies, proxy_bypass

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    proxy = getproxies().get(url.scheme)
    if proxy and not proxy_bypass(host):
        proxy_url = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return proxy_url.hostname or host, proxy_url.port or 80
    return host, port


@functools.cache
def hub_reachable() -> bool:
    """One HEAD request to HF_ENDPOINT through huggingface_hub's own HTTP session (its proxies and
    certificates, no retries), bounded by PROBE_TIMEOUT even when DNS hangs (it runs in a daemon
    thread); an answer below 500 means reachable. Kept for the life of the process. A TCP connect
    alone is not enough: a firewall or proxy may accept it and answer nothing useful."""
    result: list[bool] = []

    def probe() -> None:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        try:
            response = get_session().head(constants.ENDPOINT, timeout=PROBE_TIMEOUT, follow_redirects=False)
            result.append(response.status_code < 500)
        except Exception:  # noqa: BLE001 - any failure to get an answer means no usable network
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="vlm-adapters-hub-probe")
    thread.start()
    thread.join(PROBE_TIMEOUT + 0.5)
    return bool(result and result[0])


def no_network() -> str:
    from huggingface_hub import constants

    host, port = hub_address()
    via = "" if host == urlparse(constants.ENDPOINT).hostname else f" through the proxy {host}:{port}"
    return f"{constants.ENDPOINT} cannot be reached{via} (no network?)"


def load_errors() -> tuple[type[BaseException], ...]:
    """What loading a model by name can raise besides our own errors: transformers' OSError/ValueError,
    and the HTTP errors that huggingface_hub lets through raw (a proxy's refusal, say)."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    for module in ("httpx", "httpx2"):
        try:
            errors.append(__import__(module).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def offline_reason() -> str:
    """Why nothing is downloaded: the user's variable, --offline, or the failed probe."""
    if _reason:
        return _reason[0]
    names = [v for v in (*OFFLINE_VARS, "TRANSFORMERS_OFFLINE") if _true(v)]
    return f"offline mode is on ({', '.join(f'{v}=1' for v in names)})"


# -- models and text towers ------------------------------------------------------------------------
def hub_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def repo_cached(repo_id: str, files: tuple[str, ...] = (), revision: str | None = None) -> bool:
    """Every file of `files` is in the hub cache (any snapshot of the repo when none is named)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.file_download import repo_folder_name

    if not files:
        snapshots = Path(hub_cache()) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
        return snapshots.is_dir() and any(snapshots.iterdir())
    return all(isinstance(try_to_load_from_cache(repo_id, f, revision=revision), str) for f in files)


def require_repo(repo_id: str, what: str, files: tuple[str, ...] = (), revision: str | None = None,
                 local: str = "") -> None:
    """Return when hub repo `repo_id` can be had: cached, or the hub is reachable. A cached repo with the
    network absent switches the process offline, so it loads from the cache with no retries.
    `what` names it in the error, e.g. "model 'org/name'"; `local`: the local alternative, if any."""
    if repo_cached(repo_id, files, revision):
        if not hub_offline() and not hub_reachable():
            set_offline(no_network())
        return
    if not hub_offline():
        if hub_reachable():
            return  # it will be downloaded
        set_offline(no_network())
    raise NotAvailable(f"{what} is not available: not in the Hugging Face cache {hub_cache()}, and "
                       f"{offline_reason()}; download it on a connected machine (`hf download {repo_id}`) and copy "
                       f"the cache here (same HF_HOME{', or HF_HUB_CACHE' if 'HF_HUB_CACHE' in os.environ else ''})"
                       f"{local}")


def require_model(name: str, what: str = "model", revision: str | None = None) -> None:
    """Before transformers loads `name` (a directory written by save_pretrained, or a hub id): a
    `NotAvailable` error in one line when it cannot be had, before any retry loop."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise NotAvailable(f"{what} {shorten(name)} is a directory without config.json: give a directory written by "
                               "save_pretrained (or a hub id)")
        return
    if path.exists():
        raise NotAvailable(f"{what} {shorten(name)} is a file: give a directory written by save_pretrained (or a hub id)")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise NotAvailable(f"{what} {shorten(name)}: no such directory, and not a hub id (org/name): give a directory "
                           "written by save_pretrained or a hub id") from None
    require_repo(name, f"{what} {shorten(name)} (no such local directory)", ("config.json",), revision,
                 local=", or give a local directory saved with save_pretrained")


def open_clip_repos(arch: str) -> list[str]:
    """Hub repos an open_clip architecture fetches even without pretrained weights (its HF tokenizer,
    its HF text model's config)."""
    import open_clip

    text = (open_clip.get_model_config(arch) or {}).get("text_cfg", {})
    return sorted({text[k] for k in ("hf_tokenizer_name", "hf_model_name") if text.get(k)})


def require_open_clip(arch: str, what: str) -> None:
    """`NotAvailable` unless every hub repo that open_clip architecture `arch` (the `what`) loads can be had."""
    for repo in open_clip_repos(arch):
        require_repo(repo, f"hub repo {shorten(repo)} (open_clip {shorten(arch)}, {what}, loads its tokenizer or text model from it)")
