"""Offline and cluster use (issue 19), with the network blocked: every path that reaches for the hub
ends at once in one line that says what is missing, where it was looked for and how to get it; the
network is probed once per process, never retried; what is cached or local runs with no network."""

from __future__ import annotations

import errno
import socket
import time

import huggingface_hub.constants
import pytest
from typer.testing import CliRunner

from vlm_adapters import hub
from vlm_adapters.cli.main import app
from vlm_adapters.config import TextConfig
from vlm_adapters.text import build_text_encoder

from .conftest import make_image, save_tiny

HUB_ID = "llava-hf/llava-1.5-7b-hf"
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
              "no_proxy")


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """No route to anywhere, an empty Hugging Face cache, online mode: returns the list of the addresses
    that something tried to reach (each one a connection attempt, so a retry loop shows as repeats)."""
    import datasets.config

    attempts = []

    def unreachable(host, port, *args, **kwargs):
        attempts.append((host, port))
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", unreachable)
    for name in (*hub.OFFLINE_VARS, "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", *PROXY_VARS):
        monkeypatch.setenv(name, "0")  # recorded, so that teardown restores what set_offline() writes
        monkeypatch.delenv(name)
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(hub, "_reason", [])
    caches = [hub.hub_reachable, *_lmms_eval_cache()]
    for cache in caches:
        cache.cache_clear()
    yield attempts
    for cache in caches:
        cache.cache_clear()


def _lmms_eval_cache():
    """lmms-eval's datasets cache directory, chosen once per process."""
    try:
        from lmms_eval.api.task import _resolve_hf_datasets_cache_dir
    except ImportError:
        return []
    return [_resolve_hf_datasets_cache_dir]


PROBE = [("huggingface.co", 443)]  # the one probe a process makes


def error_line(result) -> str:
    """The CLI's error: exit code 2 and exactly one line."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "image.png"
    make_image().save(path)
    return path


def test_infer_with_a_hub_id_fails_at_once(no_network, image, tmp_path):
    result = CliRunner().invoke(app, ["infer", "--model", HUB_ID, "--image", str(image), "--question", "Colour?"])
    line = error_line(result)
    assert f"model '{HUB_ID}'" in line and str(tmp_path / "hub") in line  # what, and where it was looked for
    assert "https://huggingface.co cannot be reached" in line and f"hf download {HUB_ID}" in line  # why; how to get it
    assert no_network == PROBE  # one probe, no download attempt, no retry loop


@pytest.mark.parametrize("how", ["--offline", "HF_HUB_OFFLINE"])
def test_offline_mode_never_touches_the_network(no_network, image, how, monkeypatch):
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    flags = ["--offline"] if how == "--offline" else []
    result = CliRunner().invoke(app, [*flags, "infer", "--model", HUB_ID, "--image", str(image), "--question", "Q?"])
    line = error_line(result)
    assert f"model '{HUB_ID}'" in line and f"offline mode is on ({how}" in line
    assert no_network == []


def test_offline_flag_sets_the_variables_for_the_libraries(no_network):
    import datasets.config

    result = CliRunner().invoke(app, ["--offline", "recipes", "list"])
    assert result.exit_code == 0, result.output
    assert hub.hub_offline() and hub.datasets_offline()
    assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_DATASETS_OFFLINE  # copies taken at import


def cache_model(root, repo_id: str) -> None:
    """A tiny LLaVA placed in the hub cache as `hf download repo_id` would leave it."""
    from huggingface_hub.file_download import repo_folder_name

    commit = "0" * 40
    repo = root / repo_folder_name(repo_id=repo_id, repo_type="model")
    model, processor = save_tiny(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_a_cached_hub_model_runs_with_no_network(no_network, image, tmp_path):
    cache_model(tmp_path / "hub", "tiny/llava")
    result = CliRunner().invoke(app, ["infer", "--model", "tiny/llava", "--image", str(image), "--question", "Q?",
                                      "--max-new-tokens", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert no_network == PROBE  # found absent once; then the cache alone, with no retries
    assert hub.hub_offline()


@pytest.mark.parametrize("backend,name,repo", [("hf_clip", "openai/clip-vit-large-patch14", None),
                                               ("open_clip", "ViT-B-16-SigLIP", "timm/ViT-B-16-SigLIP")])
def test_a_text_tower_by_name_fails_at_once(no_network, backend, name, repo):
    with pytest.raises(hub.NotAvailable) as err:
        build_text_encoder(TextConfig(backend=backend, name=name), None, None)
    message = str(err.value)
    assert "\n" not in message and "text.name" in message and f"hf download {repo or name}" in message
    assert no_network == PROBE


def test_semclip_scorer_with_a_hub_tokenizer_fails_at_once(no_network):
    from vlm_adapters.semclip.scorer import RelevanceScorer

    with pytest.raises(hub.NotAvailable, match="SemClip's scorer.*`hf download timm/ViT-B-16-SigLIP`"):
        RelevanceScorer(arch="ViT-B-16-SigLIP")
    assert no_network == PROBE


def test_an_open_clip_tower_with_a_bundled_tokenizer_needs_no_network(no_network):
    from vlm_adapters.tiny import TINY_CLIP, tiny_clip

    tiny_clip()
    assert hub.open_clip_repos(TINY_CLIP) == []
    build_text_encoder(TextConfig(backend="open_clip", name=TINY_CLIP), None, None)
    assert no_network == []


def test_the_probe_is_bounded_and_made_once(monkeypatch):
    """A DNS lookup that hangs counts as no network after PROBE_TIMEOUT; the answer is kept."""
    import threading

    release = threading.Event()
    calls = []

    def hang(*args, **kwargs):
        calls.append(args)
        release.wait(5)
        raise OSError(errno.ETIMEDOUT, "timed out")

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    monkeypatch.setattr(hub, "PROBE_TIMEOUT", 0.05)
    hub.hub_reachable.cache_clear()
    try:
        assert hub.hub_reachable() is False and hub.hub_reachable() is False
        deadline = time.monotonic() + 5  # on a loaded machine the probe's thread may start after the timeout
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(calls) == 1
    finally:
        release.set()
        hub.hub_reachable.cache_clear()


def test_the_probe_goes_through_the_https_proxy(monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://huggingface.co")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.cluster:3128")
    assert hub.hub_address() == ("proxy.cluster", 3128)
    monkeypatch.setenv("NO_PROXY", "huggingface.co")
    assert hub.hub_address() == ("huggingface.co", 443)


# -- vlm-adapters eval: each task's data is checked before the model loads ----------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline") / "llava"
    model, processor = save_tiny(root)
    return root


def write_tasks(directory):
    """A hub task, a local task whose file is missing, a local task that is there, and a group of them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory.mkdir()
    common = "test_split: test\noutput_type: generate_until\ndoc_to_text: question\ndoc_to_target: answer\n"
    (directory / "remote.yaml").write_text(f"task: remote_bench\ndataset_path: someone/remote-bench\n{common}")
    (directory / "missing.yaml").write_text("task: missing_file\ndataset_path: parquet\ndataset_kwargs:\n"
                                            f"  data_files:\n    test: gone.parquet\n{common}")
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), directory / "here.parquet")
    (directory / "here.yaml").write_text("task: here_file\ndataset_path: parquet\ndataset_kwargs:\n"
                                         f"  data_files:\n    test: here.parquet\n{common}")
    (directory / "group.yaml").write_text("group: both\ntask:\n  - remote_bench\n  - here_file\n"
                                          "  - task: inline_bench\n    dataset_path: someone/inline-bench\n")
    return directory


def test_eval_names_the_tasks_whose_data_cannot_be_had(no_network, tiny_dir, tmp_path, monkeypatch):
    pytest.importorskip("lmms_eval")
    from vlm_adapters.eval import model as eval_model

    monkeypatch.setattr(eval_model.VLMAdapters, "__init__", lambda *a, **k: pytest.fail("the model was loaded"))
    tasks = write_tasks(tmp_path / "tasks")
    result = CliRunner().invoke(app, ["eval", "--model", str(tiny_dir), "--include-path", str(tasks),
                                      "--tasks", "remote_bench,missing_file,here_file"])
    line = error_line(result)
    assert "the data of 2 task(s) is not available" in line
    assert "remote_bench (hub dataset 'someone/remote-bench', not in the datasets cache " \
           f"{tmp_path / 'datasets'})" in line
    assert "missing_file (data file gone.parquet not found)" in line and "here_file" not in line
    assert "https://huggingface.co cannot be reached" in line and "get_task_dict(['remote_bench']" in line
    assert no_network == PROBE


def test_groups_are_expanded_and_cached_hub_datasets_pass(no_network, tmp_path):
    pytest.importorskip("lmms_eval")
    from lmms_eval.tasks import TaskManager

    from vlm_adapters.eval.task_data import check_task_datasets, task_configs

    manager = TaskManager("ERROR", include_path=str(write_tasks(tmp_path / "tasks")), include_defaults=False)
    configs = task_configs(manager, ["both"])
    assert sorted(configs) == ["here_file", "inline_bench", "remote_bench"]
    assert configs["here_file"]["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "tasks" / "here.parquet")
    with pytest.raises(hub.NotAvailable, match="the data of 2 task"):
        check_task_datasets(manager, ["both"])
    for name in ("remote-bench", "inline-bench"):
        (tmp_path / "datasets" / f"someone___{name}" / "default" / "0.0.0" / "abc").mkdir(parents=True)
    check_task_datasets(manager, ["both"])  # as `datasets` would find them offline
    assert hub.datasets_offline()  # the network was found absent: the cache is used with no retries
    assert no_network == PROBE


def test_the_local_world_task_runs_offline(no_network, tiny_dir, tmp_path):
    """The README's worked example: nothing reaches for the network."""
    pytest.importorskip("lmms_eval")
    result = CliRunner().invoke(app, ["--offline", "eval", "--model", str(tiny_dir), "--tasks", "vlm_world",
                                      "--export-world", str(tmp_path / "world"), "--world-samples", "2",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "vlm_world" in result.output
    assert no_network == []


def test_a_proxy_that_answers_but_refuses_is_no_network(monkeypatch):
    """A firewall or proxy may accept the connection and answer nothing useful (this is what a bare TCP
    probe would take for a network): the probe asks the hub itself, through the proxy, and sees no hub."""
    import socketserver
    import threading

    class Refuse(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.recv(4096)
            self.request.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")

    with socketserver.TCPServer(("127.0.0.1", 0), Refuse) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        for name in PROXY_VARS:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://huggingface.co")
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        hub.hub_reachable.cache_clear()
        try:
            assert hub.hub_reachable() is False
            assert "through the proxy 127.0.0.1" in hub.no_network()
        finally:
            server.shutdown()
            hub.hub_reachable.cache_clear()
