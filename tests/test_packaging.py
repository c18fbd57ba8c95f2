"""The wheel maps integrations/ and cli/ into vlm_adapters and ships the recipes, nothing else."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, cwd=tmp_path)
    wheel = next(tmp_path.glob("vlm_adapters-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"vlm_adapters", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    for module in ("vlm_adapters/integrations/llava.py", "vlm_adapters/integrations/qwen2_vl.py",
                   "vlm_adapters/integrations/perception_lm.py", "vlm_adapters/cli/main.py",
                   "vlm_adapters/recipes/__init__.py", "vlm_adapters/adapters/tgfom.py",
                   "vlm_adapters/recipes/accelerate/fsdp.yaml", "vlm_adapters/recipes/accelerate/deepspeed-zero3.yaml"):
        assert module in names
    shipped = [n for n in names if n.startswith("vlm_adapters/bench/assets/")]  # the demo's bases and CLIP
    assert sum(n.endswith("/model.safetensors") for n in shipped) == 2 and any("/clip-" in n for n in shipped)
    assert sum(n.endswith("/bench.json") for n in shipped) == 2
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "vlm-adapters = vlm_adapters.cli.main:app" in zipfile.ZipFile(wheel).read(entry).decode()


def test_each_module_imports_in_one_direction():
    """The save format (io.py) never imports the wrapper, and the version imports nothing: loading lives
    beside wrapping, so io <-> wrap is no longer a cycle."""
    code = ("import sys, vlm_adapters.io, vlm_adapters.version; "
            "print('vlm_adapters.wrap' in sys.modules, vlm_adapters.version.__version__ == vlm_adapters.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
    import importlib

    import vlm_adapters

    io, wrap = (importlib.import_module(f"vlm_adapters.{name}") for name in ("io", "wrap"))
    assert vlm_adapters.load_adapters is wrap.load_adapters and not hasattr(io, "load_adapters")
    assert not any(name.startswith("_") and "wrap" in name for name in vars(io))  # no borrowed privates
