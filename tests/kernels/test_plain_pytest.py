"""The plain `pytest` script collects what `python -m pytest` collects.

This folder has no __init__.py and bears the name of the top-level folder kernels/. The kernel tests
import `sae_kernels` (kernels/sae_kernels/), which the editable install maps from any working directory,
and the shared fixtures of tests/conftest.py, which need `eval`: `python -m pytest` puts the working
directory on sys.path, the `pytest` script does not, and without `pythonpath = ["."]` in pyproject.toml
`import eval` found tests/eval as an empty namespace package.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FOLDER = "tests/kernels"


def collect(command):
    """(exit status, collected node ids, output) of `command --collect-only -q FOLDER`, run from the repo root
    with the environment's own sys.path and pytest options removed: only the project's config counts."""
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    result = subprocess.run([*command, "--collect-only", "-q", "-p", "no:cacheprovider", FOLDER], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    node_ids = [line for line in result.stdout.splitlines() if line.startswith(FOLDER + "/") and "::" in line]
    return result.returncode, node_ids, output


def test_plain_pytest_collects_the_same_kernel_tests_as_python_m_pytest():
    script = shutil.which("pytest", path=str(Path(sys.executable).parent))
    assert script, f"no pytest script next to {sys.executable}"

    module_status, module_ids, module_output = collect([sys.executable, "-m", "pytest"])
    script_status, script_ids, script_output = collect([script])

    assert module_status == 0, module_output[-3000:]
    assert script_status == 0, script_output[-3000:]
    assert module_ids, module_output[-3000:]
    assert script_ids == module_ids
    counts = [re.search(r"(\d+) tests? collected", output) for output in (module_output, script_output)]
    assert all(counts) and int(counts[0][1]) == int(counts[1][1]) == len(module_ids)
