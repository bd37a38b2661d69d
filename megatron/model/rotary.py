"""Rotary position embeddings (RoPE): the cos / sin tables of the positions of a batch.

The tables are computed once per forward from the batch's position ids (so they
follow ``data.reset_position_ids``, pipeline stages and the key-value cache's
offset) and passed to every layer, whose attention rotates q and k with
``fused_kernels.rotary_embedding``.
"""
import torch


class RotaryEmbedding(torch.nn.Module):
    """Angles position x base^(-2i / rotary_dim) for i < rotary_dim / 2 (no parameters).

    ``forward(position_ids [b, s])`` returns fp32 ``(cos, sin)`` of shape
    [s, b, 1, rotary_dim], each frequency's angle repeated for the two halves
    that RoPE pairs (i, i + rotary_dim / 2), as Hugging Face's Llama builds them.
    """

    def __init__(self, rotary_dim, base=10000):
        super().__init__()
        self.rotary_dim = int(rotary_dim)
        self.base = base

    def inv_freq(self, device=None):
        """base^(-2i / rotary_dim), fp32 [rotary_dim / 2]."""
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.int64, device=device).float()
        return 1.0 / (self.base ** (exponents / self.rotary_dim))

    def forward(self, position_ids):
        freqs = position_ids.t().float().unsqueeze(-1) * self.inv_freq(position_ids.device)
        angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)  # [s, b, 1, rot]
        return angles.cos(), angles.sin()

    def extra_repr(self):
        return f"rotary_dim={self.rotary_dim}, base={self.base}"
