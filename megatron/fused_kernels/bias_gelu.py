"""Fused bias + GeLU (tanh approximation, as GPT-2 uses) with its reference."""
import torch.nn.functional as F

from ._dispatch import LazyCompiled, force_reference, use_triton


def bias_gelu_reference(bias, x):
    """gelu(x + bias), tanh approximation; the plain PyTorch the fused paths must match.
    ``bias`` None: gelu(x)."""
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


bias_gelu_compiled = LazyCompiled(bias_gelu_reference)


def bias_gelu_fuses(x):
    """Whether bias_gelu runs a fused kernel for ``x``; if not, callers do better to add
    the bias inside the preceding GEMM (addmm) and pass ``bias=None``."""
    return use_triton(x)


def bias_gelu(bias, x):
    """gelu(x + bias): a Triton kernel on CUDA, the reference on CPU (and for ``bias`` None).

    On CPU the reference is kept: the compiled version measured only ~13 % faster
    per call (about 1 % of a training step) but took ~23 s to compile on first
    use, a cost every short CPU run and test would pay (bench/RESULTS.md).
    """
    if bias is None or force_reference():
        return bias_gelu_reference(bias, x)
    if use_triton(x):
        from .triton_bias_gelu import bias_gelu_triton
        return bias_gelu_triton(bias, x)
    return bias_gelu_reference(bias, x)
