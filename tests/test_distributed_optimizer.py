"""Distributed (ZeRO-1) optimizer: same losses as the plain optimizer at DP=4 and
DP=2 (x TP=2), exact resume from its state dict, re-sharding from all shards,
clear refusal of a single shard from another DP size. The distributed half runs in the
optimizer tests' shared 4-process launch (tests/helpers/optimizer_launch.py,
``distributed_optimizer_body``)."""
import pytest
import torch

from megatron.mpu.distributed import finalize_model_grads
from tests.helpers.optimizer_launch import DISTOPT_ITERS, build_tiny, distributed_results
from tests.helpers.tiny_tp import TinyTP, batch


def test_distributed_optimizer_matches_plain_and_resumes_exactly():
    iters = DISTOPT_ITERS  # as in the shared launch
    results = distributed_results("distopt")
    initial = {n: p.detach() for n, p in TinyTP(seed=3).named_parameters()}  # as build_tiny's
    for rank_out in results:
        for tp, r in rank_out.items():
            assert r["dp"] == 4 // tp
            for a, b in zip(r["dist_losses"], r["plain_losses"]):
                assert abs(a - b) <= 1e-6 * abs(b), (tp, r["dist_losses"], r["plain_losses"])
            # The steps moved every param by over 100 times the tolerance below, so
            # that check is not vacuous (the initial params are TP=1's at any TP).
            for name, ref in r["plain_params"].items():
                moved = (ref - initial[name]).abs().max().item()
                assert moved > 1e-3, (tp, name, moved)
                torch.testing.assert_close(r["dist_params"][name], ref, rtol=1e-5, atol=1e-6)
            # Exact resume: identical losses and bit-identical params.
            assert r["resumed_losses"] == r["dist_losses"][iters // 2:]
            for name, ref in r["dist_params"].items():
                assert torch.equal(r["resumed_params"][name], ref), name
            plain_bytes, dist_bytes = r["state_bytes"]
            assert dist_bytes <= plain_bytes / r["dp"] + 64, (plain_bytes, dist_bytes, r["dp"])
            if "tiny" in r:
                ok, norm, ref_norm, got, ref = r["tiny"]
                assert ok and abs(norm - ref_norm) <= 1e-6 * ref_norm
                torch.testing.assert_close(got, ref)
            msg = r["mismatch_error"]
            assert msg is not None and str(r["dp"]) in msg and str(2 * r["dp"]) in msg, msg


def test_reshard_dp4_checkpoint_to_dp1():
    """Every DP=4 shard loaded at DP=1 (this process, no groups) continues the
    DP=4 run: same global losses (1e-6 relative) and params."""
    iters, num_micro = DISTOPT_ITERS, 2
    results = [r[1] for r in distributed_results("distopt")]
    model, opt = build_tiny(True)
    model.load_state_dict(results[0]["model_state"])
    opt.load_state_dict([r["shard_state"] for r in results])
    for it in range(iters // 2, iters):
        opt.zero_grad()
        total = 0.0
        for i in range(num_micro):
            xs, ys = zip(*(batch(it, i, r) for r in range(4)))
            loss = model(torch.cat(xs), torch.cat(ys)) / num_micro
            opt.scale_loss(loss).backward()
            total += loss.item()
        finalize_model_grads([model])
        assert opt.step()[0]
        dp4 = sum(r["dist_losses"][it] for r in results) / 4
        assert abs(total - dp4) <= 1e-6 * abs(dp4), (it, total, dp4)
    for name, ref in results[0]["dist_params"].items():
        torch.testing.assert_close(model.state_dict()[name], ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="all 4 data-parallel ranks"):
        opt.load_state_dict([r["shard_state"] for r in results[:3]])
