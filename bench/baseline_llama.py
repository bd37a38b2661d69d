"""A minimal Llama training step in plain PyTorch, written the way people write one by hand.

The Llama block as torchtitan / litgpt write it: nn.Embedding, nn.RMSNorm, bias-free
nn.Linear, rotary embeddings (rotate-half, cos / sin tables built once), causal
scaled_dot_product_attention over grouped K/V heads (``enable_gqa``), SwiGLU, an output
layer tied to the embedding or not. The QKV and the gate / up projections are each one
fused linear (litgpt's ``attn`` and the common ``w13``), the fastest plain way. AdamW and
clipping as bench/baseline_gpt2.py, whose ``train_step`` it shares. It is
bench/throughput.py's yardstick for the Llama-style configs.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from baseline_gpt2 import adamw, train_step  # noqa: F401  (the same optimizer and step for both)


def rope_tables(seq_length, head_dim, base):
    """cos, sin [T, head_dim] of each position's angles, halves repeated (rotate-half RoPE)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(seq_length).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x [B, heads, T, hd] rotated: pairs (i, i + hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Causal self-attention with n_kv_head K/V heads shared by n_head query heads."""

    def __init__(self, n_embd, n_head, n_kv_head):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, n_embd // n_head
        self.wqkv = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(n_embd, n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.size()
        hd = self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=2)
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, hd).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.wo(y.transpose(1, 2).contiguous().view(B, T, C))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(x W1) * (x W3)), W1 and W3 as one linear."""

    def __init__(self, n_embd, ffn):
        super().__init__()
        self.w13 = nn.Linear(n_embd, 2 * ffn, bias=False)
        self.w2 = nn.Linear(ffn, n_embd, bias=False)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-RMSNorm Llama block."""

    def __init__(self, n_embd, n_head, n_kv_head, ffn, eps):
        super().__init__()
        self.attention_norm = nn.RMSNorm(n_embd, eps=eps)
        self.attention = Attention(n_embd, n_head, n_kv_head)
        self.ffn_norm = nn.RMSNorm(n_embd, eps=eps)
        self.feed_forward = FeedForward(n_embd, ffn)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """Token embedding (no positions: RoPE), Llama blocks, final RMSNorm, output layer."""

    def __init__(self, vocab_size, block_size, n_layer, n_head, n_embd, n_kv_head, ffn,
                 rope_base=10000, eps=1e-5, tie=False):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab_size, n_embd)
        self.layers = nn.ModuleList([Block(n_embd, n_head, n_kv_head, ffn, eps) for _ in range(n_layer)])
        self.norm = nn.RMSNorm(n_embd, eps=eps)
        self.output = nn.Linear(n_embd, vocab_size, bias=False)
        if tie:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(block_size, n_embd // n_head, rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets):
        t = idx.size(1)
        cos, sin = self.cos[:t].to(self.norm.weight.dtype), self.sin[:t].to(self.norm.weight.dtype)
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.output(self.norm(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def build(vocab_size, seq_length, num_layers, num_heads, hidden_size, num_kv_heads, ffn_hidden_size,
          rope_base=10000, eps=1e-5, tie=False, device="cpu", dtype=torch.float32, lr=1e-4,
          weight_decay=0.01):
    """The model and its AdamW (decay on >= 2-D parameters only, as baseline_gpt2.build)."""
    model = Llama(vocab_size, seq_length, num_layers, num_heads, hidden_size, num_kv_heads,
                  ffn_hidden_size, rope_base, eps, tie).to(device=device, dtype=dtype)
    return model, adamw(model, device, lr, weight_decay)
