"""Kernel tests run twice: on CPU with the Triton kernels under Triton's interpreter, and on CUDA
(``@pytest.mark.gpu``, skipped without a GPU).

How the interpreter is switched on. ``@triton.jit`` picks compile-vs-interpret when it decorates a
function: Triton's own library functions (``tl.max``, ``tl.cdiv``...) at ``import triton``, ours at
import of their module. ``retroinfer.kernels`` defers its own choice to launch time
(``_triton_util.lazy_jit``) and runs Triton's library functions through the interpreter during
an interpreted launch, so the environment variable works whoever imported triton first. This
fixture therefore sets ``RETROINFER_TRITON_INTERPRET=1`` only for the CPU kernel tests, scoped to
each test: setting ``TRITON_INTERPRET=1`` for the whole session would send every other test's
CPU calls of these kernels (engine, models) through the slow interpreter too.
"""

import pytest
import torch


@pytest.fixture(autouse=True)
def _triton_mode(request, monkeypatch):
    if request.node.get_closest_marker("gpu") is not None:
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        monkeypatch.delenv("RETROINFER_TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("RETROINFER_TRITON_INTERPRET", "1")
    yield
