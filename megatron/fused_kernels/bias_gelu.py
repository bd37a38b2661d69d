"""Fused bias + GeLU (tanh approximation, as GPT-2 uses) with its reference."""
import torch.nn.functional as F

from ._dispatch import LazyCompiled, force_reference, use_triton


def bias_gelu_reference(bias, x):
    """gelu(x + bias), tanh approximation; the plain PyTorch the fused paths must match."""
    return F.gelu(x + bias, approximate="tanh")


bias_gelu_compiled = LazyCompiled(bias_gelu_reference)


def bias_gelu(bias, x):
    """gelu(x + bias): a Triton kernel on CUDA, the reference on CPU.

    On CPU the reference is kept because it measured at least as fast as the
    compiled version at the model's shapes (see bench/results_kernels.md).
    """
    if force_reference():
        return bias_gelu_reference(bias, x)
    if use_triton(x):
        from .triton_bias_gelu import bias_gelu_triton
        return bias_gelu_triton(bias, x)
    return bias_gelu_reference(bias, x)
