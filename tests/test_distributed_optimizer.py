"""Distributed (ZeRO-1) optimizer: same losses as the plain optimizer at DP=4 and
DP=2 (x TP=2), exact resume from its state dict, re-sharding from all shards,
clear refusal of a single shard from another DP size."""
import io

import pytest
import torch

from megatron import mpu
from megatron.mpu.distributed import DistributedDataParallel, finalize_model_grads
from megatron.optimizer import get_megatron_optimizer
from tests.test_clip_grads import TinyTP, batch, distributed_results, full_params, make_cfg, run_iters


def _build(distributed, precision="fp32"):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = DistributedDataParallel(TinyTP(seed=3, dtype=dtype),
                                    use_distributed_optimizer=distributed)
    opt = get_megatron_optimizer(make_cfg(precision, distributed_optimizer=distributed), [model])
    return model, opt


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _tiny_shard_step():
    """3 elements over DP=4: the last rank's shard is padding only, and must
    still take part in every collective. Returns (params after one step, reference)."""
    holder = torch.nn.Module()
    holder.w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    model = DistributedDataParallel(holder, use_distributed_optimizer=True)
    opt = get_megatron_optimizer(make_cfg(distributed_optimizer=True, clip_grad=1.0), [model])
    opt.zero_grad()
    rank = torch.distributed.get_rank()
    holder.w.main_grad.copy_(torch.tensor([1.0, 2.0, -4.0]) * (rank + 1))
    from megatron.mpu.distributed import finalize_model_grads
    finalize_model_grads([model])
    ok, norm, _ = opt.step()
    ref = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    ref.grad = torch.tensor([1.0, 2.0, -4.0]) * 2.5  # mean of (rank + 1) over 4 ranks
    ref_norm = float(ref.grad.norm())
    ref.grad.mul_(1.0 / (ref_norm + 1e-6))
    torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.0).step()
    return ok, norm, ref_norm, holder.w.detach().clone(), ref.detach().clone()


def _body(iters):
    out = {}
    for tp in (1, 2):
        mpu.initialize_model_parallel(tp, 1)
        dp = mpu.get_data_parallel_world_size()
        res = {}
        plain_model, plain_opt = _build(False)
        res["plain_losses"], _ = run_iters(plain_model, plain_opt, 0, iters)
        dist_model, dist_opt = _build(True)
        assert dist_opt.is_sharded and not plain_opt.is_sharded
        res["dist_losses"], _ = run_iters(dist_model, dist_opt, 0, iters // 2)
        model_state = _roundtrip(dist_model.state_dict())
        opt_state = _roundtrip(dist_opt.state_dict())
        # torch's load_state_dict keeps the given state tensors, and training
        # then updates them in place: keep an untouched copy for re-sharding.
        shard_copy = _roundtrip(opt_state)
        more, _ = run_iters(dist_model, dist_opt, iters // 2, iters - iters // 2)
        res["dist_losses"] += more
        res["plain_params"] = full_params(plain_model)
        res["dist_params"] = full_params(dist_model)

        # Optimizer-state bytes on this rank: masters + Adam moments.
        def state_bytes(opt):
            return sum(t.numel() * t.element_size() for s in opt.optimizer.state.values()
                       for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        res["state_bytes"] = (state_bytes(plain_opt), state_bytes(dist_opt))

        resumed_model, resumed_opt = _build(True)
        resumed_model.load_state_dict(model_state)
        resumed_opt.load_state_dict(opt_state)
        res["resumed_losses"], _ = run_iters(resumed_model, resumed_opt, iters // 2,
                                             iters - iters // 2)
        res["resumed_params"] = full_params(resumed_model)

        wrong = dict(opt_state, data_parallel_size=dp * 2)
        try:
            resumed_opt.load_state_dict(wrong)
            res["mismatch_error"] = None
        except ValueError as e:
            res["mismatch_error"] = str(e)
        res["dp"] = dp
        if dp == 4:
            res["tiny"] = _tiny_shard_step()
            # For re-sharding to DP=1 in the parent process.
            res["shard_state"], res["model_state"] = shard_copy, model_state
        out[tp] = res
        mpu.destroy_model_parallel()
    return out


def test_distributed_optimizer_matches_plain_and_resumes_exactly():
    iters = 6  # as in tests.test_clip_grads._all_checks
    results = distributed_results("distopt")
    for rank_out in results:
        for tp, r in rank_out.items():
            assert r["dp"] == 4 // tp
            for a, b in zip(r["dist_losses"], r["plain_losses"]):
                assert abs(a - b) <= 1e-6 * abs(b), (tp, r["dist_losses"], r["plain_losses"])
            # Training moved the losses (the check above is not vacuous).
            assert r["plain_losses"][0] != r["plain_losses"][-1]
            for name, ref in r["plain_params"].items():
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
    iters, num_micro = 6, 2
    results = [r[1] for r in distributed_results("distopt")]
    model, opt = _build(True)
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
