"""Causal core attention, softmax(q k^T * scale + causal mask) v, with its reference."""
import math

import torch
import torch.nn.functional as F

from ._dispatch import force_reference


def _repeat_kv(t, num_heads):
    """[b, ng, s, hn] -> [b, np, s, hn]: query head i reads K/V group i // (np / ng)."""
    groups = t.size(1)
    if groups == num_heads:
        return t
    b, _, s, hn = t.shape
    return t.unsqueeze(2).expand(b, groups, num_heads // groups, s, hn).reshape(b, num_heads, s, hn)


def core_attention_reference(q, k, v, dropout_p=0.0, training=True, softmax_scale=None):
    """Explicit scale + causal mask + fp32 softmax + dropout; q: [b, np, s, hn], k, v:
    [b, ng, s, hn] with ng dividing np (grouped-query attention; ng == np is multi-head).

    The mask is aligned to the bottom right (query i sees keys up to
    i + s_k - s_q), which is plain causal when s_q == s_k.
    """
    k, v = _repeat_kv(k, q.size(1)), _repeat_kv(v, q.size(1))
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.size(-1))
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    s_q, s_k = scores.shape[-2], scores.shape[-1]
    mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).triu(1 + s_k - s_q)
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1).to(q.dtype)
    probs = F.dropout(probs, p=dropout_p, training=training)
    return torch.matmul(probs, v)


def core_attention_sdpa(q, k, v, dropout_p=0.0, training=True, softmax_scale=None):
    """Causal attention through scaled_dot_product_attention (flash / memory-efficient kernels).

    Those kernels accumulate the softmax in fp32 for fp16/bf16 inputs and never
    materialize the [s, s] score matrix; dropout draws from the default generator.
    """
    if k.size(1) != q.size(1):  # grouped-query attention: SDPA shares K/V heads itself
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p if training else 0.0,
                                              is_causal=True, scale=softmax_scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p if training else 0.0,
                                          is_causal=True, scale=softmax_scale)


def core_attention(q, k, v, dropout_p=0.0, training=True, softmax_scale=None):
    """Causal attention [b, np, s, hn] -> [b, np, s, hn] on the fastest path for the device
    (k, v may have fewer heads: [b, ng, s, hn], grouped-query attention).

    scaled_dot_product_attention on every device (measured faster than the
    reference on CPU too, see bench/RESULTS.md); the reference when
    forced, or when queries and keys differ in length (SDPA's causal mask is
    aligned top-left, the reference's bottom-right).
    """
    if force_reference() or q.size(-2) != k.size(-2):
        return core_attention_reference(q, k, v, dropout_p, training, softmax_scale)
    return core_attention_sdpa(q, k, v, dropout_p, training, softmax_scale)
