"""Rotary position embeddings (RoPE) applied to queries or keys, computed in fp32."""
import torch

from ._dispatch import force_reference, use_triton


def rotary_embedding_reference(t, cos, sin):
    """Rotate the first ``rot`` dims of each head of ``t`` by its position's angles.

    ``t``: [s, b, heads, hn] in any dtype; ``cos``, ``sin``: fp32 [s, b, 1, rot]
    (angles of the rot/2 frequencies, repeated for the two halves). Pairs are
    (i, i + rot/2) ("rotate half", as GPT-NeoX, Megatron-Core and Hugging Face's
    Llama do): y = x * cos + [-x2, x1] * sin. Dims past ``rot`` pass through.
    The arithmetic is fp32; the result is cast back to t's dtype.
    """
    rot = cos.shape[-1]
    tf = t.float()
    x, rest = tf[..., :rot], tf[..., rot:]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = x * cos + rotated * sin
    if rest.shape[-1]:  # partial rotation; with every dim rotated a cat would only copy
        out = torch.cat((out, rest), dim=-1)
    return out.to(t.dtype)


def rotary_embedding(t, cos, sin):
    """RoPE on ``t`` [s, b, heads, hn] (see the reference): a Triton kernel on CUDA that
    reads ``t`` in place (any head/batch/sequence strides) in one pass, the reference
    elsewhere."""
    if not force_reference() and use_triton(t):
        from .triton_rotary import rotary_embedding_triton
        return rotary_embedding_triton(t, cos, sin)
    return rotary_embedding_reference(t, cos, sin)
