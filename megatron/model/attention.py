"""Causal self-attention with heads split across tensor-parallel ranks."""
import torch

from megatron import fused_kernels, mpu
from megatron.model.utils import dropout_rng_context


class ParallelAttention(torch.nn.Module):
    """GPT-2 self-attention: fused QKV (column-parallel), causal core, output projection (row-parallel).

    The QKV output columns are ordered per head, [np, 3, hn], so each TP rank's
    column shard holds whole heads and attention needs no communication.
    ``selective_recompute`` runs the attention core (scores, softmax, dropout,
    weighted sum: the activations that grow with s^2) under
    ``mpu.checkpoint``, recomputing it in backward instead of storing it.
    ``forward`` returns (output, bias): the ``dense`` bias not yet added where a fused
    bias-dropout-add will add it (CUDA), else None (added inside the GEMM).
    """

    def __init__(self, hidden_size, num_attention_heads, attention_dropout, init_method,
                 output_init_method, sequence_parallel=False, selective_recompute=False):
        super().__init__()
        tp = mpu.get_tensor_model_parallel_world_size()
        self.head_dim = hidden_size // num_attention_heads
        self.local_heads = num_attention_heads // tp
        self.attention_dropout = attention_dropout
        self.selective_recompute = selective_recompute
        self.query_key_value = mpu.ColumnParallelLinear(
            hidden_size, 3 * hidden_size, bias=True, gather_output=False,
            init_method=init_method, sequence_parallel=sequence_parallel)
        self.dense = mpu.RowParallelLinear(
            hidden_size, hidden_size, bias=True, input_is_parallel=True,
            init_method=output_init_method, skip_bias_add=True,
            sequence_parallel=sequence_parallel)

    def _core(self, q, k, v):
        # Each TP rank holds different heads, so attention dropout draws from
        # the model-parallel RNG (different on each TP rank).
        active = self.training and self.attention_dropout > 0
        with dropout_rng_context(True, active):
            return fused_kernels.core_attention(q, k, v, dropout_p=self.attention_dropout,
                                                training=self.training)

    def forward(self, hidden_states, inference_params=None):
        """[s(/tp), b, h] -> ([s(/tp), b, h], bias [h]).

        With ``inference_params`` (a key-value cache) the new keys and values
        are appended to the cache and the queries attend to every cached
        position (causally, aligned to the last query).
        """
        qkv, _ = self.query_key_value(hidden_states)
        s, b = qkv.shape[0], qkv.shape[1]
        qkv = qkv.view(s, b, self.local_heads, 3, self.head_dim)
        # [s, b, np, 3, hn] -> 3 x [b, np, s, hn]. Unbind first, then permute: backward
        # then stacks the three grads straight into the [s, b, np, 3, hn] layout (one
        # copy); permuting first would stack them as [3, b, np, s, hn] and copy again.
        q, k, v = (t.permute(1, 2, 0, 3) for t in qkv.unbind(3))
        if inference_params is not None:
            k, v = inference_params.update(self, k, v)
        if self.selective_recompute and self.training and torch.is_grad_enabled():
            context = mpu.checkpoint(self._core, q, k, v)
        else:
            context = self._core(q, k, v)
        context = context.permute(2, 0, 1, 3).reshape(s, b, self.local_heads * self.head_dim)
        return self.dense(context, skip_bias_add=fused_kernels.bias_dropout_add_fuses(context))
