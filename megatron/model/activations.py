"""The MLP's activation (model.activation): GPT-2's tanh GeLU, the exact erf GeLU, or SwiGLU.

Each is called as ``act(x, bias)`` on the output of the MLP's first linear, with
``bias`` that linear's bias when the activation fuses it (``fuses_bias``), else
None (the linear added it inside its GEMM). ``gated`` activations take an input
twice ffn_hidden_size wide: [gate; up] on each rank (see ParallelMLP).
"""
import torch.nn.functional as F

from megatron import fused_kernels


class GeLUTanh:
    """gelu_tanh(x + bias), GPT-2's; a fused bias + GeLU kernel on CUDA."""
    gated = False

    def fuses_bias(self, x):
        return fused_kernels.bias_gelu_fuses(x)

    def __call__(self, x, bias):
        return fused_kernels.bias_gelu(bias, x)


class GeLU:
    """The exact erf GeLU, x * Phi(x) (Megatron-Core's when its bias-GeLU fusion is off)."""
    gated = False

    def fuses_bias(self, x):
        return False

    def __call__(self, x, bias):
        return F.gelu(x if bias is None else x + bias)


class SwiGLU:
    """silu(gate) * up of x = [gate, up] (Llama's MLP); a fused kernel on CUDA."""
    gated = True

    def fuses_bias(self, x):
        return False

    def __call__(self, x, bias):
        return fused_kernels.swiglu(x if bias is None else x + bias)


ACTIVATIONS = {"gelu_tanh": GeLUTanh, "gelu": GeLU, "swiglu": SwiGLU}


def build_activation(name):
    """The activation called ``name`` (a key of ACTIVATIONS)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation={name!r} is not one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()
