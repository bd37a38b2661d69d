"""Tensor-parallel layers and mappings equal the serial computation.

One 4-process gloo launch (tests/helpers/tp_launch.py) runs every check of
tests/helpers/tp_layer_checks.py at TP=4, then re-initializes at TP=2 x DP=2 and
runs them again; the same launch also runs the distributed checks of
test_cross_entropy and test_mpu_random. Each rank builds the serial reference itself
from the same seeds (plain ``torch.nn.functional`` on the full weights), so
the parent only compares the reported errors with the tolerance.
"""
import pytest
import torch
import torch.nn.functional as F

from megatron import mpu
from tests.helpers.tp_launch import tp_launch_results
from tests.helpers.tp_layer_checks import (ATOL, B, H_IN, H_OUT, S, err, full_weight, init_normal,
                                           randn)


@pytest.fixture(scope="module")
def layer_results():
    return tp_launch_results()


def test_layers_and_mappings_equal_serial_at_tp4_and_tp2(layer_results):
    for rank, result in enumerate(layer_results):
        errs = result["layers"]
        assert len(errs) > 50
        bad = {k: v for k, v in errs.items() if not v <= ATOL}
        assert not bad, f"rank {rank}: {bad}"


def test_sizes_not_divisible_by_tp_are_one_line_errors(layer_results):
    messages = layer_results[0]["indivisible"]
    assert all(m is not None and "\n" not in m for m in messages), messages
    assert "(7)" in messages[0] and "(2)" in messages[0]
    assert "(5)" in messages[1]
    assert "(51)" in messages[2] and "pad" in messages[2]


def test_single_process_layers_are_plain_linear_and_embedding():
    """Without any process group the layers are the serial layers."""
    assert not mpu.model_parallel_is_initialized()
    torch.manual_seed(5)
    col = mpu.ColumnParallelLinear(H_IN, H_OUT, init_method=init_normal, skip_bias_add=True)
    x = randn(50, S, B, H_IN)
    out, bias = col(x)
    assert bias is col.bias and col.weight.shape == (H_OUT, H_IN)
    assert err(out, F.linear(x, full_weight(5, (H_OUT, H_IN)))) <= ATOL
    torch.manual_seed(6)
    emb = mpu.VocabParallelEmbedding(10, 4, init_method=init_normal)
    ids = torch.tensor([[0, 9, 3]])
    assert err(emb(ids), F.embedding(ids, full_weight(6, (10, 4)))) <= ATOL


def test_params_dtype_and_keyword_only_arguments():
    torch.manual_seed(7)
    row = mpu.RowParallelLinear(8, 4, init_method=init_normal, params_dtype=torch.bfloat16, bias=False)
    assert row.weight.dtype == torch.bfloat16 and row.bias is None
    # The bf16 shard is the rounded fp32 master weight.
    assert torch.equal(row.weight, full_weight(7, (4, 8)).to(torch.bfloat16))
    with pytest.raises(TypeError):
        mpu.ColumnParallelLinear(8, 4, True, init_method=init_normal)



def test_per_call_skip_bias_add_overrides_the_constructor():
    """The model skips the bias add per call (only where a fused op adds it); at TP=1 a
    RowParallelLinear that adds its bias does so inside the GEMM, with the same values."""
    torch.manual_seed(8)
    row = mpu.RowParallelLinear(H_OUT, H_IN, input_is_parallel=True, init_method=init_normal,
                                skip_bias_add=True)
    with torch.no_grad():
        row.bias.copy_(randn(51, H_IN))
    x = randn(52, S, B, H_OUT).requires_grad_()
    skipped, bias = row(x)
    assert bias is row.bias
    added, none = row(x, skip_bias_add=False)
    assert none is None
    ref = F.linear(x, row.weight, row.bias)
    assert err(added, ref) <= ATOL and err(skipped + bias, ref) <= ATOL
    added.sum().backward()
    assert err(row.bias.grad, torch.full((H_IN,), float(S * B))) <= ATOL
    col = mpu.ColumnParallelLinear(H_IN, H_OUT, init_method=init_normal, skip_bias_add=False)
    y, none = col(ref.detach(), skip_bias_add=True)
    assert none is col.bias and err(y, F.linear(ref.detach(), col.weight)) <= ATOL
