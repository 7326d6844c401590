"""Shared plumbing of the Triton kernels: optional import, dispatch rule, lazy jit and jit helpers,
host-side integer helpers and the base-2 constants.

Dispatch rule (every public kernel function follows it):

* tensors on CUDA                                  -> the Triton kernel, compiled;
* ``RETROINFER_TRITON_INTERPRET=1`` or ``TRITON_INTERPRET=1`` in the environment
                                                   -> the Triton kernel, run by Triton's CPU
                                                      interpreter (so CI exercises it on CPU);
* otherwise (CPU tensors, or Triton not installed) -> the plain-torch ``*_ref`` function.

Triton decides between compiling and interpreting when ``@triton.jit`` runs, i.e. at import time of
the kernel module. ``lazy_jit`` defers that choice to launch time, so the environment variable works
whatever imported ``retroinfer.kernels`` (or triton) first. Device functions that several kernels
call are ``jit_helper``s: compiled, Triton inlines them, so a helper that issues the same ops in the
same order as the inline code leaves the kernel's machine code as it was.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

try:  # Triton is optional: CPU-only installs use the torch references.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

_TRUE = ("1", "true", "yes", "on")


def interpret_requested() -> bool:
    """True when the environment asks for the Triton CPU interpreter."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE
               for k in ("RETROINFER_TRITON_INTERPRET", "TRITON_INTERPRET"))


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the public function should run its Triton kernel on these tensors."""
    if triton is None:
        return False
    if interpret_requested():
        return True
    return all(t.is_cuda for t in tensors)


class LazyKernel:
    """``@triton.jit`` whose compile-vs-interpret choice is made at launch (``kernel[grid](...)``)."""

    def __init__(self, fn):
        self.fn = fn
        self._jit = None
        self._interp = None
        functools.update_wrapper(self, fn)

    def variant(self):
        if interpret_requested():
            if self._interp is None:
                from triton.runtime.interpreter import InterpretedFunction
                self._interp = InterpretedFunction(self.fn)
            return self._interp
        if self._jit is None:
            from triton.runtime.jit import JITFunction
            self._jit = JITFunction(self.fn)
        return self._jit

    def __getitem__(self, grid):
        launch = self.variant()[grid]
        if not interpret_requested():
            return launch

        def run_interpreted(*args, **kwargs):
            with _interpreter_compat():
                return launch(*args, **kwargs)
        return run_interpreted


@contextlib.contextmanager
def _interpreter_compat():
    """Make an interpreted launch work whoever imported triton first, on triton 3.x.

    * Triton's own ``@jit`` library functions (``tl.max``, ``tl.cdiv``...) are built when
      ``triton`` is imported, as compiled ``JITFunction``s unless ``TRITON_INTERPRET=1`` was set by
      then, our ``jit_helper`` functions always are, and a ``JITFunction`` refuses calls outside a
      compiled kernel. For the launch only, such calls run through the interpreter, as they would
      have had the variable been set.
    * Older interpreters (triton 3.6) turn a one-element array into a loop bound with
      ``int(array)``, which numpy refuses for shape ``(1,)``: read its single element instead.
    """
    from triton.runtime import interpreter as interp
    from triton.runtime.jit import JITFunction

    saved = []
    cache = {}

    def call(self, *args, **kwargs):
        f = cache.get(self.fn)
        if f is None:
            f = cache[self.fn] = interp.InterpretedFunction(self.fn).rewrite()
        # InterpretedFunction.__call__ would leave triton.language.core patched for good,
        # breaking later compiled launches in this process: undo the patch after the call.
        scope = interp._patch_lang(self.fn)
        try:
            return f(*args, **kwargs)
        finally:
            if hasattr(scope, "restore"):
                scope.restore()
    saved.append((JITFunction, "__call__", JITFunction.__call__))
    JITFunction.__call__ = call

    patch_tensor = getattr(interp, "_patch_lang_tensor", None)
    if patch_tensor is not None:
        def index(self):
            return int(self.handle.data.reshape(-1)[0])

        def patched(tensor, *args, **kwargs):
            out = patch_tensor(tensor, *args, **kwargs)
            scope = args[0] if args else kwargs.get("scope")
            if scope is not None and hasattr(scope, "set_attr"):
                scope.set_attr(tensor, "__index__", index)
            return out
        saved.append((interp, "_patch_lang_tensor", patch_tensor))
        interp._patch_lang_tensor = patched
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def lazy_jit(fn):
    """Decorator used instead of ``@triton.jit`` on every kernel body (launched as ``kernel[grid]``)."""
    return LazyKernel(fn)


def jit_helper(fn):
    """Decorator used instead of ``@triton.jit`` on a device function that kernels call.

    The helper is a plain ``JITFunction`` whatever the environment: a compiled kernel inlines it
    (it takes part in the kernel's cache key), and an interpreted ``LazyKernel`` launch runs it
    through the interpreter (``_interpreter_compat``). Without Triton it stays the Python function,
    never called (every launcher then takes its torch reference).
    """
    if triton is None:
        return fn
    from triton.runtime.jit import JITFunction
    return JITFunction(fn)


LOG2E = 1.4426950408889634
"""log2(e): the kernels score in base 2 (``exp(x) = exp2(x * LOG2E)``; exp2 is one instruction)."""
LN2 = 0.6931471805599453
"""ln(2): turns a base-2 log-sum-exp back into the natural log that partial states carry."""


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton block shapes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of integers (host side; ``tl.cdiv`` in kernels)."""
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessors of the device; a small number under the interpreter (cost ~ programs)."""
    if device.type != "cuda" or interpret_requested():
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def pick_splits(programs: int, max_splits: int, device: torch.device, waves: int = 4,
                num_splits: int | None = None) -> int:
    """Splits of the reduction axis: ``num_splits`` when the caller overrides it, else enough that
    ``programs * splits`` fills the GPU ``waves`` times; either way within ``[1, max_splits]``."""
    if num_splits is None:
        num_splits = cdiv(waves * num_sms(device), max(1, programs))
    return max(1, min(int(num_splits), max_splits))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products for fp32 inputs (tf32 would cost ~1e-3)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_last_contiguous(name: str, t: torch.Tensor) -> None:
    assert t.stride(-1) == 1, f"{name}: last dim must be contiguous, strides {tuple(t.stride())}"


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
