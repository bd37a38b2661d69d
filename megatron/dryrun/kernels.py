"""The one kernel choice of a CUDA run whose memory a CPU process would get wrong.

A dry run computes on fake CPU tensors, so torch picks CPU kernels. Their tensors have
the sizes CUDA's would, except attention with dropout: CPU's
``scaled_dot_product_attention`` then falls back to the math path, which keeps the
[b, heads, s, s] scores, probabilities and dropout mask of every layer for backward,
while CUDA's memory-efficient and flash kernels keep only the output and a
log-sum-exp per query. ``CudaAttention`` routes the call to the memory-efficient
kernel (its meta implementation runs on fake CPU tensors) when the dry run's target is
CUDA; every other op runs as on the CPU (Triton fusions are not emulated: they change
which elementwise temporaries exist, not the saved activations' sizes).
"""
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class CudaAttention(TorchFunctionMode):
    """Torch function mode: ``F.scaled_dot_product_attention`` -> CUDA's memory-efficient
    attention kernel (forward and backward through its autograd formula)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _efficient_attention(*args, **kwargs)
        return func(*args, **kwargs)


def _efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                         scale=None, enable_gqa=False):
    needs_grad = any(t.requires_grad for t in (query, key, value)) and torch.is_grad_enabled()
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, needs_grad, dropout_p, is_causal, scale=scale)
    return out[0]
