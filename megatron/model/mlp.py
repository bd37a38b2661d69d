"""The transformer MLP: h -> ffn (column-parallel), activation, ffn -> h (row-parallel)."""
import torch

from megatron import fused_kernels, mpu
from megatron.model.activations import build_activation


class ParallelMLP(torch.nn.Module):
    """The MLP split across TP ranks as in the Megatron paper.

    ``dense_h_to_4h`` keeps its output split (no communication); the activation
    acts on each rank's slice; ``dense_4h_to_h`` takes the split input and reduces
    (all-reduce, or reduce-scatter with sequence parallelism). Where bias+GeLU
    and bias+dropout+add run fused (CUDA) both skip their bias add for them.
    With a gated activation (SwiGLU) ``dense_h_to_4h`` is 2 x ffn wide, the full
    weight [gate; up] and each rank's shard [gate_r; up_r] (column split with
    stride 2), so every rank holds matching gate and up columns.
    ``forward`` returns (output, bias): the bias of ``dense_4h_to_h`` not yet
    added, or None when it was (or there is none).
    """

    def __init__(self, hidden_size, ffn_hidden_size, init_method, output_init_method,
                 sequence_parallel=False, activation="gelu_tanh", bias=True):
        super().__init__()
        self.activation = build_activation(activation)
        blocks = 2 if self.activation.gated else 1
        self.dense_h_to_4h = mpu.ColumnParallelLinear(
            hidden_size, blocks * ffn_hidden_size, bias=bias, gather_output=False,
            init_method=init_method, skip_bias_add=True, sequence_parallel=sequence_parallel,
            stride=blocks)
        self.dense_4h_to_h = mpu.RowParallelLinear(
            ffn_hidden_size, hidden_size, bias=bias, input_is_parallel=True,
            init_method=output_init_method, skip_bias_add=True,
            sequence_parallel=sequence_parallel)

    def forward(self, hidden_states):
        """[s(/tp), b, h] -> ([s(/tp), b, h], bias [h] or None)."""
        # Each bias is left out of its GEMM only when a fused op will add it (CUDA);
        # otherwise it is added inside the GEMM, which costs nothing extra.
        x, bias = self.dense_h_to_4h(hidden_states,
                                     skip_bias_add=self.activation.fuses_bias(hidden_states))
        x = self.activation(x, bias)
        return self.dense_4h_to_h(x, skip_bias_add=fused_kernels.bias_dropout_add_fuses(x))
