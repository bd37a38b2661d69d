"""One pre-norm transformer layer (GPT-2's, or a Llama-style one) built from tensor-parallel parts."""
import torch

from megatron import fused_kernels
from megatron.model.attention import ParallelAttention
from megatron.model.mlp import ParallelMLP
from megatron.model.norms import build_norm
from megatron.model.utils import (dropout_rng_context, init_method_normal,
                                  mark_sequence_parallel, scaled_init_method_normal)


class ParallelTransformerLayer(torch.nn.Module):
    """x + Attn(Norm(x)), then x + MLP(Norm(x)), with dropout on each residual branch.

    The norm (LayerNorm / RMSNorm), the attention's query groups and the MLP's
    activation follow ``cfg.model``; biases exist when ``model.add_bias_linear``.

    Hidden states are [s, b, h], or [s/tp, b, h] with sequence parallelism,
    where the LayerNorms and residual dropouts act on this rank's sequence
    shard (their parameters' grads are then partial: marked
    ``sequence_parallel`` for the TP all-reduce in ``finalize_model_grads``).
    """

    def __init__(self, cfg, sequence_parallel=False):
        super().__init__()
        m = cfg.model
        h = m.hidden_size
        ffn = m.ffn_hidden_size or 4 * h
        init = init_method_normal(m.init_method_std)
        output_init = scaled_init_method_normal(m.init_method_std, m.num_layers)
        self.hidden_dropout = m.hidden_dropout
        self.sequence_parallel = sequence_parallel
        self.input_layernorm = build_norm(m)
        self.self_attention = ParallelAttention(
            h, m.num_attention_heads, m.attention_dropout, init, output_init,
            sequence_parallel=sequence_parallel,
            selective_recompute=(cfg.training.recompute == "selective"),
            num_query_groups=m.num_query_groups, bias=m.add_bias_linear)
        self.post_attention_layernorm = build_norm(m)
        self.mlp = ParallelMLP(h, ffn, init, output_init, sequence_parallel=sequence_parallel,
                               activation=m.activation, bias=m.add_bias_linear)
        if sequence_parallel:
            mark_sequence_parallel([*self.input_layernorm.parameters(),
                                    *self.post_attention_layernorm.parameters(),
                                    self.self_attention.dense.bias, self.mlp.dense_4h_to_h.bias])

    def _residual_rng(self):
        # Residual dropout acts on replicated activations unless the sequence
        # is split, in which case each rank holds a different shard and must
        # draw its own mask from the model-parallel RNG.
        return dropout_rng_context(self.sequence_parallel,
                                   self.training and self.hidden_dropout > 0)

    def forward(self, hidden_states, rotary=None, inference_params=None):
        """[s(/tp), b, h] -> [s(/tp), b, h]; ``rotary``: the RoPE (cos, sin) tables or None;
        ``inference_params``: optional key-value cache."""
        out, bias = self.self_attention(self.input_layernorm(hidden_states), rotary=rotary,
                                        inference_params=inference_params)
        with self._residual_rng():
            hidden_states = fused_kernels.bias_dropout_add(
                out, bias, hidden_states, self.hidden_dropout, self.training)
        out, bias = self.mlp(self.post_attention_layernorm(hidden_states))
        with self._residual_rng():
            hidden_states = fused_kernels.bias_dropout_add(
                out, bias, hidden_states, self.hidden_dropout, self.training)
        return hidden_states
