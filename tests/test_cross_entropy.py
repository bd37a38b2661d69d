"""Vocab-parallel cross entropy equals the serial loss and gradient.

The distributed checks (tests/helpers/tp_cross_entropy_checks.py) run in the
4-process mpu launch of tests/helpers/tp_launch.py (TP=4, then TP=2 x DP=2):
padded and exact vocabularies, targets on partition edges, bf16 logits, the tied output layer
(the transpose of the vocab-parallel embedding), and that only small
per-token tensors are communicated (the logits are never gathered).
"""
import pytest
import torch
import torch.nn.functional as F

from megatron import mpu
from tests.helpers.tp_launch import tp_launch_results
from tests.helpers.tp_layer_checks import ATOL, B, S, err, randn


def test_vocab_parallel_cross_entropy_equals_serial_at_tp4_and_tp2():
    for rank, result in enumerate(tp_launch_results()):
        errs = result["cross_entropy"]
        assert len(errs) > 20
        # A value is an error (tolerance ATOL) or an (error, tolerance) pair.
        bad = {k: v for k, v in errs.items()
               if not (v[0] <= v[1] if isinstance(v, tuple) else v <= ATOL)}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_single_process_matches_cross_entropy_and_autograd(dtype):
    """TP=1 (no process group): loss and hand-written backward equal autograd's."""
    logits_full = randn(10, S, B, 40, scale=3.0).to(dtype)
    target = torch.randint(0, 40, (S, B), generator=torch.Generator().manual_seed(11))
    logits = logits_full.clone().requires_grad_()
    loss = mpu.vocab_parallel_cross_entropy(logits, target)
    loss.sum().backward()
    ref_logits = logits_full.float().requires_grad_()
    ref = F.cross_entropy(ref_logits.view(-1, 40), target.view(-1), reduction="none").view(S, B)
    ref.sum().backward()
    assert loss.dtype == torch.float32 and loss.shape == target.shape
    assert err(loss, ref) <= (ATOL if dtype == torch.float32 else 1e-5)
    assert logits.grad.dtype == dtype
    tol = ATOL if dtype == torch.float32 else 1e-2
    assert err(logits.grad, ref_logits.grad) <= tol


def test_int32_targets_work():
    logits = torch.randn(4, 7)
    target = torch.tensor([0, 6, 3, 2], dtype=torch.int32)
    loss = mpu.vocab_parallel_cross_entropy(logits, target)
    assert err(loss, F.cross_entropy(logits, target.long(), reduction="none")) <= ATOL


def test_large_logits_stay_finite():
    """The max is subtracted before exp: logits of 1e4 give finite losses."""
    logits = torch.tensor([[1e4, 0.0, -1e4], [1e4, 1e4, 1e4]], requires_grad=True)
    loss = mpu.vocab_parallel_cross_entropy(logits, torch.tensor([1, 2]))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    assert abs(loss[0].item() - 1e4) < 1e-2
    assert abs(loss[1].item() - torch.log(torch.tensor(3.0)).item()) < 1e-6


def test_target_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"target shape \(3,\)"):
        mpu.vocab_parallel_cross_entropy(torch.zeros(2, 5), torch.zeros(3, dtype=torch.long))


def test_inplace_gives_the_same_loss_and_grad_bit_for_bit():
    """``inplace=True`` (the model's path) overwrites fp32 logits instead of copying them;
    loss and gradient are identical to the copying path, in fp32 and bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(6, 5, 11, generator=torch.Generator().manual_seed(3)).to(dtype)
        target = torch.randint(0, 11, (6, 5), generator=torch.Generator().manual_seed(4))
        results = []
        for inplace in (False, True):
            leaf = x.clone().requires_grad_()
            logits = leaf * 1  # a non-leaf temporary, as the model's logits are
            loss = mpu.vocab_parallel_cross_entropy(logits, target, inplace=inplace)
            (loss * torch.arange(30.0).view(6, 5)).sum().backward()
            results.append((loss.detach(), leaf.grad, logits.detach().clone()))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
        # The copying path leaves the caller's logits alone; the in-place one reuses fp32 ones.
        assert torch.equal(results[0][2], x)
        assert torch.equal(results[1][2], x) == (dtype != torch.float32)
