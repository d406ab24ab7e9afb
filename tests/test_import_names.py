"""Our import names stay ours, and other packages' names stay theirs.

transformers (>= 5.25) requires Hugging Face's `kernels`, whose import name is the name of our top-level
folder `kernels/`. The Triton kernels are therefore the package `sae_kernels` (kernels/sae_kernels/), and
kernels/ has no __init__.py: from the repository root a plain `import kernels` must still find Hugging
Face's regular package, which transformers imports while it loads a model. Each check runs in a fresh
interpreter with no PYTHONPATH, once from the repository root (where `python train.py` runs: the root is
sys.path[0]) and once from a folder outside it (a notebook, a script of a user's).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Each import name of ours and the folder it must come from (a virtual environment may lie inside the
# repository too, as .ci/run makes it, so "somewhere in the repository" would not do).
OUR_PACKAGES = {"sae": REPO / "sae", "eval": REPO / "eval", "sae_kernels": REPO / "kernels" / "sae_kernels"}
SOURCE_FOLDERS = [*OUR_PACKAGES.values(), REPO / "kernels", REPO / "tests"]

WHERE_EACH_NAME_RESOLVES = f"""
import importlib, importlib.util, json
found = {{}}
for name in {list(OUR_PACKAGES)!r}:
    found[name] = importlib.import_module(name).__file__
spec = importlib.util.find_spec("kernels")
# A regular package has an origin; a namespace package (only our folder kernels/, when Hugging Face's
# is not installed) has none and holds nothing importable.
found["kernels"] = None if spec is None else spec.origin
print(json.dumps(found))
"""


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def inside(path: str, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder)


def ours(path: str) -> bool:
    return any(inside(path, folder) for folder in SOURCE_FOLDERS)


@pytest.fixture(params=["repository root", "another folder"])
def cwd(request, tmp_path) -> Path:
    return REPO if request.param == "repository root" else tmp_path


def test_the_kernels_folder_is_not_a_package():
    assert (REPO / "kernels" / "sae_kernels" / "__init__.py").is_file()
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/__init__.py would shadow Hugging Face's kernels"


def test_each_of_our_import_names_resolves_inside_this_repository(cwd):
    result = run_python(WHERE_EACH_NAME_RESOLVES, cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout)
    for name, folder in OUR_PACKAGES.items():
        assert inside(found[name], folder), (name, found[name])
    if found["kernels"] is not None:
        assert not ours(found["kernels"]), f"`import kernels` found {found['kernels']}, not Hugging Face's"


def test_transformers_sees_hugging_faces_kernels_when_it_is_installed(cwd):
    code = """
import importlib.util, json
from transformers.utils import import_utils
print(json.dumps([importlib.util.find_spec("kernels") is not None and
                  importlib.util.find_spec("kernels").origin is not None, import_utils.is_kernels_available()]))
"""
    result = run_python(code, cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    installed, available = json.loads(result.stdout)
    if installed:
        assert available, "transformers does not take the installed `kernels` for Hugging Face's"


def test_a_training_step_through_transformers(cwd, text_file, tmp_path):
    """The embedded model loads through transformers (which imports Hugging Face's `kernels` where
    installed) and one SAE step runs on our kernels, from wherever Python was started."""
    out_dir = tmp_path / "runs"
    code = f"""
import json, kernels
from sae.config import parse_args
from sae.trainer import train
cfg = parse_args(["--data.dataset", {str(text_file)!r}, "--batch_size", "512", "--max_tokens", "512",
                  "--sae.n_latents", "256", "--data.shuffle_buffer_tokens", "1024", "--save_every", "0",
                  "--out_dir", {str(out_dir)!r}, "--run_name", "one-step"], usage="")
folder = train(cfg)
print(json.dumps({{"folder": str(folder), "kernels": getattr(kernels, "__file__", None)}}))
"""
    result = run_python(code, cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    done = json.loads(result.stdout.strip().splitlines()[-1])
    assert (Path(done["folder"]) / "sae.safetensors").is_file()
    assert done["kernels"] is None or not ours(done["kernels"])
