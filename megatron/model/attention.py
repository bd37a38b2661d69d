"""Causal self-attention with heads (and K/V groups) split across tensor-parallel ranks."""
import torch

from megatron import fused_kernels, mpu
from megatron.model.utils import dropout_rng_context


class ParallelAttention(torch.nn.Module):
    """Self-attention: fused QKV (column-parallel), causal core, output projection (row-parallel).

    Grouped-query attention: ``num_query_groups`` (ng) K/V heads, each shared by
    np / ng query heads (ng = np, the default, is GPT-2's multi-head attention;
    ng = 1 multi-query). The QKV output columns are ordered per group,
    [ng, np / ng + 2, hn]: the group's query heads, then its key, then its
    value. A TP rank's column shard is then whole groups (ng must be divisible
    by TP) and attention needs no communication; with ng = np this is GPT-2's
    per-head [np, 3, hn]. docs/models.md relates it to a plain [q; k; v].
    ``rotary`` (cos, sin tables, see model/rotary.py) rotates q and k before the
    key-value cache stores k, so cached keys keep their own positions.
    ``selective_recompute`` runs the attention core (scores, softmax, dropout,
    weighted sum: the activations that grow with s^2) under
    ``mpu.checkpoint``, recomputing it in backward instead of storing it.
    ``forward`` returns (output, bias): the ``dense`` bias not yet added where a fused
    bias-dropout-add will add it (CUDA), else None (added inside the GEMM, or no bias).
    """

    def __init__(self, hidden_size, num_attention_heads, attention_dropout, init_method,
                 output_init_method, sequence_parallel=False, selective_recompute=False,
                 num_query_groups=None, bias=True):
        super().__init__()
        tp = mpu.get_tensor_model_parallel_world_size()
        groups = num_query_groups or num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.local_heads = num_attention_heads // tp
        self.local_groups = groups // tp
        self.heads_per_group = num_attention_heads // groups
        self.attention_dropout = attention_dropout
        self.selective_recompute = selective_recompute
        self.query_key_value = mpu.ColumnParallelLinear(
            hidden_size, (num_attention_heads + 2 * groups) * self.head_dim, bias=bias,
            gather_output=False, init_method=init_method, sequence_parallel=sequence_parallel)
        self.dense = mpu.RowParallelLinear(
            hidden_size, hidden_size, bias=bias, input_is_parallel=True,
            init_method=output_init_method, skip_bias_add=True,
            sequence_parallel=sequence_parallel)

    def _core(self, q, k, v):
        # Each TP rank holds different heads, so attention dropout draws from
        # the model-parallel RNG (different on each TP rank).
        active = self.training and self.attention_dropout > 0
        with dropout_rng_context(True, active):
            return fused_kernels.core_attention(q, k, v, dropout_p=self.attention_dropout,
                                                training=self.training)

    def forward(self, hidden_states, rotary=None, inference_params=None):
        """[s(/tp), b, h] -> ([s(/tp), b, h], bias [h] or None).

        With ``inference_params`` (a key-value cache) the new keys and values
        are appended to the cache and the queries attend to every cached
        position (causally, aligned to the last query).
        """
        qkv, _ = self.query_key_value(hidden_states)
        s, b = qkv.shape[0], qkv.shape[1]
        qkv = qkv.view(s, b, self.local_groups, self.heads_per_group + 2, self.head_dim)
        q, k, v = qkv.split([self.heads_per_group, 1, 1], dim=3)
        q = q.reshape(s, b, self.local_heads, self.head_dim)  # a view when heads_per_group is 1
        k, v = k.squeeze(3), v.squeeze(3)                     # [s, b, ng/tp, hn]
        if rotary is not None:
            q, k = fused_kernels.rotary_embedding(q, *rotary), fused_kernels.rotary_embedding(k, *rotary)
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        if inference_params is not None:
            k, v = inference_params.update(self, k, v)
        if self.selective_recompute and self.training and torch.is_grad_enabled():
            context = mpu.checkpoint(self._core, q, k, v)
        else:
            context = self._core(q, k, v)
        context = context.permute(2, 0, 1, 3).reshape(s, b, self.local_heads * self.head_dim)
        return self.dense(context, skip_bias_add=fused_kernels.bias_dropout_add_fuses(context))
