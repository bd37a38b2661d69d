"""fp16 / bf16 with fp32 master weights: an inf on one rank skips the step on
every rank (params bit-identical), and tiny half-precision runs track fp32.
"""
import torch
import torch.distributed as dist

from megatron import mpu
from megatron.mpu.distributed import DistributedDataParallel, finalize_model_grads
from megatron.optimizer import get_megatron_optimizer
from tests.test_clip_grads import TinyTP, batch, distributed_results, make_cfg, run_iters

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _inf_body(poisoned_rank):
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


def test_inf_on_one_rank_skips_step_everywhere_tp2_dp2():
    results = distributed_results("inf")  # global rank 3 poisoned, see _all_checks
    for rank, res in enumerate(results):
        for (precision, distributed), r in res.items():
            where = f"rank {rank} {precision} distributed={distributed}"
            assert r["ok"] is False, where
            assert r["unchanged"], where
            assert r["next_ok"] is True, where
            before, after = r["scale"]
            if precision == "fp16":  # hysteresis 1: the first overflow halves the scale
                assert after == before / 2, (where, before, after)
            else:
                assert before == after == 1.0, where


def _curve(precision, iters=20):
    torch.manual_seed(0)
    model = DistributedDataParallel(TinyTP(seed=7, dtype=DTYPES[precision]))
    cfg = make_cfg(precision, lr=3e-3, initial_loss_scale=2.0 ** 12)
    opt = get_megatron_optimizer(cfg, [model])
    losses, steps = run_iters(model, opt, 0, iters, num_micro=2)
    return losses, steps


def test_half_precision_tracks_fp32_loss_curve():
    # Stated tolerance: every iteration's loss within 1% (fp16) / 3% (bf16,
    # 8-bit mantissa) of the fp32 run's, over 20 iterations.
    ref, _ = _curve("fp32")
    assert sum(ref[-5:]) < 0.9 * sum(ref[:5])  # the run learns, so tracking means something
    for precision, tol in (("fp16", 0.01), ("bf16", 0.03)):
        losses, steps = _curve(precision)
        assert all(ok for ok, _, _ in steps), precision
        rel = max(abs(a - b) / abs(b) for a, b in zip(losses, ref))
        assert rel < tol, (precision, rel, losses, ref)
