"""kernels/ is `retroinfer.kernels`; with the repository root on sys.path (`python -m` in a
checkout, and the Ray workers `serve run` starts there) `import kernels` must still give the PyPI
package of that name, which transformers imports when it is installed."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_import_kernels_in_a_checkout_is_the_pypi_package():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the PyPI package `kernels` is not installed: nothing to shadow")
    code = "import kernels, sys; print(kernels.__file__); print(hasattr(kernels, 'use_triton'))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    path, ours = r.stdout.split()
    assert Path(path).resolve().parent != ROOT / "kernels" and ours == "False", r.stdout + r.stderr
