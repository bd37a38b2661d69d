"""fp16 / bf16 with fp32 master weights: an inf on one rank skips the step on
every rank (params bit-identical), and tiny half-precision runs track fp32.

The distributed half runs in the optimizer tests' shared 4-process launch
(tests/helpers/optimizer_launch.py, ``inf_body``).
"""
import torch

from megatron.mpu.distributed import DistributedDataParallel
from megatron.optimizer import get_megatron_optimizer
from tests.helpers.optimizer_launch import distributed_results
from tests.helpers.tiny_tp import DTYPES, TinyTP, make_cfg, run_iters


def test_inf_on_one_rank_skips_step_everywhere_tp2_dp2():
    results = distributed_results("inf")  # global rank 3 poisoned (see the launch)
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
