"""Switching parallel.distributed_optimizer on or off when resuming keeps the Adam
state: at DP=2, 3 iterations with one optimizer kind, save, 3 more with the other
give the losses of 6 uninterrupted iterations (fp32 both ways, bf16 plain ->
distributed and fp16 distributed -> plain through the fp32 masters), and the
saved step count goes on to 6.
State that cannot be converted is refused with one line."""
import os

import torch

from tests.dist_harness import run_distributed
from tests.helpers.training import make_corpus, run_pretrain, tiny_overrides

N = 3


def _step_of(root, rank):
    """The Adam step count in the iteration-2N checkpoint under `root` (this DP rank's shard)."""
    rank_dir = os.path.join(root, f"iter_{2 * N:07d}", "mp_rank_00")
    shard = os.path.join(rank_dir, f"distrib_optim_dp_{rank:03d}.pt")
    if os.path.exists(shard):
        state = torch.load(shard, weights_only=True)["optimizer"]["state"]
    else:
        saved = torch.load(os.path.join(rank_dir, "model_optim_rng.pt"), weights_only=True)
        state = saved["optimizer"]["optimizer"]["state"]
    return float(state[0]["step"])


def _switch_runs(workdir):
    rank = torch.distributed.get_rank()
    prefix = os.path.join(workdir, "corpus")
    if rank == 0:
        make_corpus(prefix)
    torch.distributed.barrier()

    def run(precision, distributed, **extra):
        return run_pretrain(tiny_overrides(prefix, **{
            "training.train_iters": 2 * N, "training.eval_iters": 0,
            "training.precision": precision, "parallel.distributed_optimizer": distributed,
            **extra}))["train_losses"]

    out = {}
    # fp16: a small initial loss scale, so that no step is skipped for overflow and
    # the dynamic scaler's state (scale, growth tracker) must carry over too.
    cases = (("fp32", (False, True), {}), ("bf16", (False,), {}),
             ("fp16", (True,), {"optimizer.initial_loss_scale": 256}))
    for precision, first_kinds, scale in cases:
        out[precision] = {"straight": run(precision, False, **scale)}
        for first in first_kinds:
            root = os.path.join(workdir, f"{precision}_{'dist' if first else 'plain'}")
            run(precision, first, **{"checkpoint.save": root, "training.exit_interval": N, **scale})
            # Resume with the other kind; it saves at 2N, in its own format.
            resumed = run(precision, not first, **{"checkpoint.load": root,
                                                   "checkpoint.save": root + "_resumed", **scale})
            torch.distributed.barrier()
            out[precision][f"{first}->{not first}"] = (resumed, _step_of(root + "_resumed", rank))
    # Still refused: fp32 plain state has no fp32 masters for a bf16 distributed optimizer.
    from megatron import mpu
    from megatron.checkpoint import CheckpointError
    try:
        run("bf16", True, **{"checkpoint.load": os.path.join(workdir, "fp32_plain")})
    except CheckpointError as e:
        out["refused"] = str(e)
    mpu.destroy_model_parallel()
    return out


def test_switch_distributed_optimizer_on_resume(tmp_path):
    results = run_distributed(_switch_runs, 2, str(tmp_path))
    for r in results:
        msg = r.pop("refused", None)
        assert msg is not None and "\n" not in msg, msg
        assert "0 fp32 master params" in msg and "half-precision params" in msg and \
            "parallel.distributed_optimizer=true" in msg, msg
        for precision, runs in r.items():
            straight = runs.pop("straight")
            assert sorted(straight) == list(range(1, 2 * N + 1))
            for switch, (resumed, step) in runs.items():
                assert sorted(resumed) == list(range(N + 1, 2 * N + 1)), (precision, switch)
                # A fresh Adam (or lost moments / masters) would take other steps:
                # the losses after the first resumed step would differ by far more.
                for i in range(N + 1, 2 * N + 1):
                    assert abs(resumed[i] - straight[i]) <= 1e-6 * abs(straight[i]), \
                        (precision, switch, i, resumed, straight)
                assert step == 2 * N, (precision, switch, step)  # not N: the count was carried
