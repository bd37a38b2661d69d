"""SwiGLU: silu(gate) * up, with gate and up the two halves of the last dimension."""
import torch.nn.functional as F

from ._dispatch import force_reference, use_triton


def swiglu_reference(x):
    """x = [gate, up] along the last dim (each half f wide) -> silu(gate) * up [..., f].

    Computed in fp32 and cast back to the input dtype.
    """
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def swiglu(x):
    """silu(gate) * up of ``x`` = [gate, up]: a Triton kernel on CUDA (one pass over x,
    saving only x for backward), the reference elsewhere."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dimension ([gate, up]), got {x.shape[-1]}")
    if not force_reference() and use_triton(x):
        from .triton_swiglu import swiglu_triton
        return swiglu_triton(x)
    return swiglu_reference(x)
