"""The one 4-process launch of the optimizer tests (process start-up dominates their
cost on a small CPU box): what each rank computes for test_clip_grads (``clip``),
test_distributed_optimizer (``distopt``) and test_mixed_precision (``inf``); the test
files compare the per-rank results that ``distributed_results(key)`` returns with
their serial references.
"""
import io

import torch
import torch.distributed as dist

from megatron import mpu
from megatron.mpu.distributed import DistributedDataParallel, finalize_model_grads
from megatron.optimizer import get_megatron_optimizer
from megatron.optimizer.clip_grads import counts_toward_norm, get_grad_norm
from tests.dist_harness import run_distributed
from tests.helpers.tiny_tp import DTYPES, TinyTP, batch, full_params, make_cfg, run_iters

CLIP_NUM_MICRO, CLIP = 2, 0.05  # the clipping check: micro batches, clip_grad
DISTOPT_ITERS = 6               # the distributed-optimizer check: iterations (resume halfway)
POISONED_RANK = 3               # the inf check: the global rank whose grad gets an inf


# ---- test_clip_grads: global norm and clipping at TP=2 x DP=2, finalize's sums ----

def clip_body(num_micro, clip):
    """Grad norm, one clipped step, finalize_model_grads' TP / DP / embedding sums."""
    mpu.initialize_model_parallel(2, 1)
    res = {}
    model = DDP = DistributedDataParallel(TinyTP(), accumulate_allreduce_grads_in_fp32=True)
    opt = get_megatron_optimizer(make_cfg(clip_grad=clip), [model])
    opt.zero_grad()
    dp = mpu.get_data_parallel_rank()
    for i in range(num_micro):
        x, y = batch(0, i, dp)
        (model(x, y) / num_micro).backward()
    finalize_model_grads([model])
    counted = [p.main_grad for p in model.parameters() if counts_toward_norm(p)]
    res["norm"] = get_grad_norm(counted)
    ok, res["step_norm"], _ = opt.step()
    res["ok"] = ok
    res["params"] = full_params(DDP)

    # finalize_model_grads: a sequence_parallel param is summed over TP, then
    # every param averaged over DP.
    holder = torch.nn.Module()
    holder.sp = torch.nn.Parameter(torch.zeros(3))
    holder.sp.sequence_parallel = True
    holder.plain = torch.nn.Parameter(torch.zeros(3))
    ddp = DistributedDataParallel(holder)
    me = dist.get_rank()
    ddp.module.sp.main_grad.fill_(me + 1)
    ddp.module.plain.main_grad.fill_(me + 1)
    finalize_model_grads([ddp])
    layout = [None] * dist.get_world_size()
    dist.all_gather_object(layout, (mpu.get_tensor_model_parallel_global_ranks(),
                                    mpu.get_data_parallel_global_ranks()))
    tp_of = {r: layout[r][0] for r in range(len(layout))}
    dp_ranks = layout[me][1]
    res["sp_expected"] = sum(sum(t + 1 for t in tp_of[d]) for d in dp_ranks) / len(dp_ranks)
    res["plain_expected"] = sum(d + 1 for d in dp_ranks) / len(dp_ranks)
    res["sp"] = ddp.module.sp.main_grad.clone()
    res["plain"] = ddp.module.plain.main_grad.clone()
    mpu.destroy_model_parallel()

    # PP=2: the tied embedding's grads are summed over the embedding group; the
    # last stage's copy (shared_embedding) is left out of the norm.
    mpu.initialize_model_parallel(1, 2)
    stage = mpu.get_pipeline_model_parallel_rank()
    holder = torch.nn.Module()
    holder.emb = torch.nn.Parameter(torch.zeros(4))
    holder.emb.tied_embedding = True
    if stage == 1:
        holder.emb.shared_embedding = True
    holder.own = torch.nn.Parameter(torch.zeros(2))
    ddp = DistributedDataParallel(holder)
    ddp.module.emb.main_grad.copy_(torch.arange(4.0) * (stage + 1))
    ddp.module.own.main_grad.fill_(stage + 2.0)
    finalize_model_grads([ddp])
    res["emb"] = ddp.module.emb.main_grad.clone()
    counted = [p.main_grad for p in holder.parameters() if counts_toward_norm(p)]
    res["pp_norm"] = get_grad_norm(counted)
    mpu.destroy_model_parallel()
    return res


# ---- test_distributed_optimizer: ZeRO-1 equals the plain optimizer, resumes exactly ----

def build_tiny(distributed, precision="fp32"):
    """TinyTP(seed=3) in DDP with the distributed (ZeRO-1) or the plain optimizer."""
    model = DistributedDataParallel(TinyTP(seed=3, dtype=DTYPES[precision]),
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
    finalize_model_grads([model])
    ok, norm, _ = opt.step()
    ref = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    ref.grad = torch.tensor([1.0, 2.0, -4.0]) * 2.5  # mean of (rank + 1) over 4 ranks
    ref_norm = float(ref.grad.norm())
    ref.grad.mul_(1.0 / (ref_norm + 1e-6))
    torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.0).step()
    return ok, norm, ref_norm, holder.w.detach().clone(), ref.detach().clone()


def distributed_optimizer_body(iters):
    """At TP=1 x DP=4 and TP=2 x DP=2: plain and distributed losses and params, a resume
    from the distributed state halfway, its state bytes, a wrong-DP-size load error."""
    out = {}
    for tp in (1, 2):
        mpu.initialize_model_parallel(tp, 1)
        dp = mpu.get_data_parallel_world_size()
        res = {}
        plain_model, plain_opt = build_tiny(False)
        res["plain_losses"], _ = run_iters(plain_model, plain_opt, 0, iters)
        dist_model, dist_opt = build_tiny(True)
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

        resumed_model, resumed_opt = build_tiny(True)
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


# ---- test_mixed_precision: an inf on one rank skips the step on every rank ----

def inf_body(poisoned_rank):
    """Per precision and optimizer kind: one clean step, then one with an inf in one
    rank's grad (after the DP reduction): skipped or not, params unchanged, loss scale."""
    mpu.initialize_model_parallel(2, 1)
    out = {}
    cases = [("fp16", False), ("fp16", True), ("bf16", False), ("bf16", True), ("fp32", False)]
    for precision, distributed in cases:
        model = DistributedDataParallel(TinyTP(seed=5, dtype=DTYPES[precision]),
                                        use_distributed_optimizer=distributed)
        cfg = make_cfg(precision, distributed_optimizer=distributed,
                       initial_loss_scale=2.0 ** 10, hysteresis=1)
        opt = get_megatron_optimizer(cfg, [model])
        run_iters(model, opt, 0, 1)  # one clean step first
        before = {k: v.clone() for k, v in model.state_dict().items()}
        scale_before = float(opt.get_loss_scale())
        opt.zero_grad()
        x, y = batch(1, 0, mpu.get_data_parallel_rank())
        opt.scale_loss(model(x, y)).backward()
        finalize_model_grads([model])
        if dist.get_rank() == poisoned_rank:
            # After the DP reduction, so only the found-inf / norm reduction can
            # tell the other ranks.
            p = next(model.module.fc2.parameters())
            p.main_grad.view(-1)[0] = float("inf")
        ok, norm, _ = opt.step()
        after = model.state_dict()
        out[(precision, distributed)] = {
            "ok": ok,
            "unchanged": all(torch.equal(before[k], after[k]) for k in before),
            "scale": (scale_before, float(opt.get_loss_scale())),
        }
        # And the next clean iteration steps again.
        _, steps = run_iters(model, opt, 2, 1)
        out[(precision, distributed)]["next_ok"] = steps[0][0]
    mpu.destroy_model_parallel()
    return out


def _all_checks():
    return {"clip": clip_body(CLIP_NUM_MICRO, CLIP),
            "distopt": distributed_optimizer_body(DISTOPT_ITERS),
            "inf": inf_body(POISONED_RANK)}


_RESULTS = {}


def distributed_results(key):
    """Per-rank results of check ``key`` from the shared 4-rank launch (run once
    per pytest session; a failure is re-raised by every test that asks)."""
    if "all" not in _RESULTS:
        try:
            _RESULTS["all"] = run_distributed(_all_checks, 4)
        except BaseException as e:  # remember it: do not relaunch for each test
            _RESULTS["all"] = e
    got = _RESULTS["all"]
    if isinstance(got, BaseException):
        raise AssertionError(f"shared distributed launch failed: {got}")
    return [r[key] for r in got]
