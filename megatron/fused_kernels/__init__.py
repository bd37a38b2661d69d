"""Fused ops used by the model, each with a plain-PyTorch reference.

Placeholder with the reference implementations only; the signatures are the
interface the model relies on (see docs/architecture.md).
"""
import math

import torch
import torch.nn.functional as F


def bias_gelu(bias, x):
    """gelu(x + bias), tanh approximation as in GPT-2."""
    return F.gelu(x + bias, approximate="tanh")


def bias_dropout_add(x, bias, residual, prob, training):
    """residual + dropout(x + bias); ``bias`` may be None."""
    if bias is not None:
        x = x + bias
    return residual + F.dropout(x, p=prob, training=training)


def core_attention(q, k, v, dropout_p=0.0, training=True, softmax_scale=None):
    """Causal attention. q, k, v: [b, np, s, hn] -> [b, np, s, hn].

    Softmax in fp32 whatever the input dtype.
    """
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.size(-1))
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    s_q, s_k = scores.shape[-2], scores.shape[-1]
    mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).triu(1 + s_k - s_q)
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1).to(q.dtype)
    probs = F.dropout(probs, p=dropout_p, training=training)
    return torch.matmul(probs, v)


class LayerNorm(torch.nn.LayerNorm):
    """LayerNorm with the parameters of torch.nn.LayerNorm (weight, bias)."""
