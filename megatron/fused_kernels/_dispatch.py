"""How each fused op picks its path: Triton on CUDA, torch.compile where it pays, else the reference.

Nothing here is built ahead of time: Triton is imported the first time a CUDA
tensor asks for a Triton kernel, and compiled functions are compiled on first
call. ``MEGATRON_FUSED_KERNELS=reference`` forces every op onto its
plain-PyTorch reference (for debugging, or to measure what fusion buys).
"""
import functools
import importlib.util
import os
import warnings

import torch


def force_reference():
    """True when the environment asks for the plain-PyTorch references everywhere."""
    return os.environ.get("MEGATRON_FUSED_KERNELS", "").lower() == "reference"


@functools.lru_cache(maxsize=None)
def triton_available():
    """True when triton can be imported (checked once; never raises)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken triton install must not break the model
        return False
    return True


def use_triton(t):
    """Whether a tensor should go through a Triton kernel: on CUDA, with triton importable."""
    return t.is_cuda and not force_reference() and triton_available()


class LazyCompiled:
    """``torch.compile(fn)`` built on first call; falls back to ``fn`` for good if compiling fails.

    A failing compiler (no C++ toolchain, an unsupported GPU) costs one warning,
    never a crash: the reference computes the same values.
    """

    def __init__(self, fn):
        self.fn = fn
        self.compiled = None
        self.failed = False
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        if self.failed:
            return self.fn(*args, **kwargs)
        if self.compiled is None:
            # dynamic=None (automatic): the first shape compiles static, as
            # training needs; a second shape (inference: each prompt length,
            # then one-token steps) recompiles once with dynamic sizes instead
            # of once per length up to the recompile limit.
            self.compiled = torch.compile(self.fn, dynamic=None)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as e:  # compilation happens lazily, inside the first call
            warnings.warn(f"torch.compile of {self.fn.__name__} failed ({type(e).__name__}: {e}); "
                          f"using the reference from now on")
            self.failed = True
            return self.fn(*args, **kwargs)
