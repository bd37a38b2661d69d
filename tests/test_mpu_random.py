"""Model-parallel RNG tracker and activation checkpointing that replays RNG.

Single-process tests cover the tracker and ``checkpoint``; dropout masks
across TP ranks (TP=4, TP=2 x DP=2) come from the 4-process mpu launch of
tests/helpers/tp_launch.py (``dropout_masks``).
"""
import io

import pytest
import torch
import torch.nn.functional as F

from megatron import mpu
from tests.helpers.tp_launch import tp_launch_results

SEED = 1234


@pytest.fixture(autouse=True)
def _fresh_tracker():
    mpu.get_rng_tracker().reset()
    yield
    mpu.get_rng_tracker().reset()


def test_split_region_masks_differ_across_tp_ranks_replicated_equal():
    results = tp_launch_results()
    world = len(results)
    for tp in (4, 2):
        masks = [r["masks"][tp] for r in results]
        for rank in range(world):
            replicated, split, replicated_after = masks[rank]
            # Replicated regions: the same mask on every rank.
            assert torch.equal(replicated, masks[0][0])
            assert torch.equal(replicated_after, masks[0][2])
            # The tracker is another stream than the default generator.
            assert not torch.equal(split, replicated)
            for other in range(world):
                same_tp_rank = rank % tp == other % tp
                # Split regions: different across TP ranks, equal across DP
                # replicas of the same TP rank.
                assert torch.equal(split, masks[other][1]) == same_tp_rank, (tp, rank, other)


def test_fork_leaves_the_default_stream_untouched_and_advances_its_own():
    mpu.model_parallel_seed(SEED)
    ones = torch.ones(1000)
    first = F.dropout(ones, 0.5)
    with mpu.get_rng_tracker().fork():
        a = F.dropout(ones, 0.5)
    with mpu.get_rng_tracker().fork():
        b = F.dropout(ones, 0.5)
    second = F.dropout(ones, 0.5)
    assert not torch.equal(a, b)

    torch.manual_seed(SEED)
    assert torch.equal(F.dropout(ones, 0.5), first)
    assert torch.equal(F.dropout(ones, 0.5), second)


def test_states_round_trip_through_weights_only_load():
    mpu.model_parallel_seed(SEED)
    tracker = mpu.get_rng_tracker()
    with tracker.fork():
        torch.rand(10)
    buf = io.BytesIO()
    torch.save(tracker.get_states(), buf)
    with tracker.fork():
        expected = torch.rand(10)
    buf.seek(0)
    tracker.set_states(torch.load(buf, weights_only=True))
    with tracker.fork():
        assert torch.equal(torch.rand(10), expected)


def test_tracker_rejects_duplicates_and_unknown_names():
    tracker = mpu.get_rng_tracker()
    tracker.add("a", 1)
    with pytest.raises(ValueError, match="seed 1"):
        tracker.add("b", 1)
    with pytest.raises(ValueError, match="'a'"):
        tracker.add("a", 2)
    with pytest.raises(KeyError, match="'c'"):
        with tracker.fork("c"):
            pass


class _Block(torch.nn.Module):
    """Linear -> dropout in a split region -> linear -> dropout, replicated."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 16)

    def forward(self, x, p, scale=None):
        h = self.fc1(x)
        with mpu.get_rng_tracker().fork():
            h = F.dropout(h, p, training=True)
        out = F.dropout(self.fc2(F.gelu(h)), p, training=True)
        return out if scale is None else out * scale


def _run(block, x, checkpointed, seed, scale=None):
    mpu.model_parallel_seed(seed)
    block.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = mpu.checkpoint(block, x, 0.3, scale) if checkpointed else block(x, 0.3, scale)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
    after_forward = torch.rand(3)
    loss.backward()
    after_backward = torch.rand(3)
    grads = [p.grad.clone() for p in block.parameters()] + [x.grad.clone()]
    return out.detach(), grads, after_forward, after_backward


def test_checkpoint_recompute_gives_bit_identical_grads_with_dropout():
    torch.manual_seed(0)
    block = _Block()
    x = torch.randn(8, 16)
    out_ref, grads_ref, fwd_ref, bwd_ref = _run(block, x, False, SEED, scale=2.0)
    out_ck, grads_ck, fwd_ck, bwd_ck = _run(block, x, True, SEED, scale=2.0)
    assert torch.equal(out_ref, out_ck)
    assert all(torch.equal(a, b) for a, b in zip(grads_ref, grads_ck))
    # The recomputation does not disturb the RNG streams the caller sees next.
    assert torch.equal(fwd_ref, fwd_ck) and torch.equal(bwd_ref, bwd_ck)
    # And the masks matter: another seed gives other grads.
    _, grads_other, _, _ = _run(block, x, True, SEED + 1, scale=2.0)
    assert not torch.equal(grads_ref[0], grads_other[0])


def test_checkpoint_between_draws_replays_the_forward_states():
    """Randomness drawn between forward and backward must not leak into the
    recomputation (the backward restores the forward's states)."""
    torch.manual_seed(0)
    block = _Block()
    x = torch.randn(8, 16)
    out_ref, grads_ref, _, _ = _run(block, x, False, SEED)
    mpu.model_parallel_seed(SEED)
    block.zero_grad(set_to_none=True)
    xc = x.clone().requires_grad_()
    out = mpu.checkpoint(block, xc, 0.3, None)
    torch.rand(100)
    with mpu.get_rng_tracker().fork():
        torch.rand(100)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    assert torch.equal(out.detach(), out_ref)
    assert all(torch.equal(a, b) for a, b in zip(grads_ref, [p.grad for p in block.parameters()] + [xc.grad]))


def test_checkpoint_tuple_outputs_non_tensor_args_and_input_without_grad():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)  # does not require grad: parameters still get grads

    def fn(a, none, factor, flag):
        assert none is None and flag is True
        y = lin(a) * factor
        return y, y.sum(dim=-1)

    y, s = mpu.checkpoint(fn, x, None, 3.0, True)
    (y.sum() + s.sum()).backward()
    ref_lin = torch.nn.Linear(4, 4)
    ref_lin.load_state_dict(lin.state_dict())
    ry = ref_lin(x) * 3.0
    (ry.sum() + ry.sum(dim=-1).sum()).backward()
    assert torch.equal(y, ry.detach())
    assert torch.equal(lin.weight.grad, ref_lin.weight.grad)
    assert torch.equal(lin.bias.grad, ref_lin.bias.grad)


def test_checkpoint_under_no_grad_just_runs():
    """Under no_grad (evaluation) ``checkpoint`` is the plain call: the same values,
    dropout masks from the same RNG streams, which it advances as the call does."""
    torch.manual_seed(0)
    block = _Block()
    x = torch.randn(8, 16)
    runs = []
    for checkpointed in (True, False):
        mpu.model_parallel_seed(SEED)
        with torch.no_grad():
            y = mpu.checkpoint(block, x, 0.3, 2.0) if checkpointed else block(x, 0.3, 2.0)
        with mpu.get_rng_tracker().fork():
            tracked_after = torch.rand(3)
        runs.append((y, torch.rand(3), tracked_after))
    (y, after, tracked_after), (ref, ref_after, ref_tracked_after) = runs
    assert torch.equal(y, ref) and (y == 0).any()  # dropout did act
    assert torch.equal(after, ref_after) and torch.equal(tracked_after, ref_tracked_after)
    assert not y.requires_grad and y.grad_fn is None


def test_model_parallel_seed_uses_tp_rank_offset():
    mpu.model_parallel_seed(SEED)
    with mpu.get_rng_tracker().fork():
        a = torch.rand(5)
    torch.manual_seed(SEED + 2718)  # tp rank 0
    assert torch.equal(a, torch.rand(5))
