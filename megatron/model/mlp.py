"""The transformer MLP: h -> ffn (column-parallel), GeLU, ffn -> h (row-parallel)."""
import torch

from megatron import fused_kernels, mpu


class ParallelMLP(torch.nn.Module):
    """GPT-2's MLP split across TP ranks as in the Megatron paper.

    ``dense_h_to_4h`` keeps its output split (no communication); GeLU acts on
    each rank's slice; ``dense_4h_to_h`` takes the split input and reduces
    (all-reduce, or reduce-scatter with sequence parallelism). Where bias+GeLU
    and bias+dropout+add run fused (CUDA) both skip their bias add for them.
    ``forward`` returns (output, bias): the bias of ``dense_4h_to_h`` not yet
    added, or None when it was.
    """

    def __init__(self, hidden_size, ffn_hidden_size, init_method, output_init_method,
                 sequence_parallel=False):
        super().__init__()
        self.dense_h_to_4h = mpu.ColumnParallelLinear(
            hidden_size, ffn_hidden_size, bias=True, gather_output=False,
            init_method=init_method, skip_bias_add=True, sequence_parallel=sequence_parallel)
        self.dense_4h_to_h = mpu.RowParallelLinear(
            ffn_hidden_size, hidden_size, bias=True, input_is_parallel=True,
            init_method=output_init_method, skip_bias_add=True,
            sequence_parallel=sequence_parallel)

    def forward(self, hidden_states):
        """[s(/tp), b, h] -> ([s(/tp), b, h], bias [h])."""
        # Each bias is left out of its GEMM only when a fused op will add it (CUDA);
        # otherwise it is added inside the GEMM, which costs nothing extra.
        x, bias = self.dense_h_to_4h(hidden_states,
                                     skip_bias_add=fused_kernels.bias_gelu_fuses(hidden_states))
        x = fused_kernels.bias_gelu(bias, x)
        return self.dense_4h_to_h(x, skip_bias_add=fused_kernels.bias_dropout_add_fuses(x))
