"""Resharding a checkpoint of the distributed (ZeRO-1) optimizer with --include-optimizer:
4 iterations at TP=1 x DP=2 with parallel.distributed_optimizer=true, converted to
TP=2 (fp32), or kept at TP=1 (bf16: the fp32 masters come from the shards), written in
the plain optimizer's format, resume to 6 with the losses of the original resumed at its
own layout; the converted Adam step count is 4 (the state was carried, not reset).
(bf16 stays at TP=1: at another layout bf16 rounding alone moves the loss by ~3e-5.)

One 2-process launch.
"""
import os

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.helpers.training import make_corpus, reset_layout, reshard_overrides, run_pretrain


def _runs(workdir):
    rank = torch.distributed.get_rank()
    prefix = os.path.join(workdir, "corpus")
    if rank == 0:
        make_corpus(prefix)
    torch.distributed.barrier()
    return {"fp32_tp2": _scenario(workdir, prefix, "fp32", 2, 1),
            "bf16_tp1": _scenario(workdir, prefix, "bf16", 1, 1)}


def _scenario(workdir, prefix, precision, tp, pp):
    from megatron.checkpoint import convert_checkpoint
    rank = torch.distributed.get_rank()
    orig = os.path.join(workdir, f"{precision}_orig")
    conv = os.path.join(workdir, f"{precision}_tp{tp}_pp{pp}")
    dist = {"parallel.distributed_optimizer": True, "training.precision": precision}
    run_pretrain(reshard_overrides(prefix, 1, 1, **{"training.train_iters": 4,
                                                    "checkpoint.save": orig, **dist}))
    reset_layout()
    straight = run_pretrain(reshard_overrides(prefix, 1, 1, **{"training.train_iters": 6,
                                                               "checkpoint.load": orig, **dist}))
    reset_layout()
    info = None
    if rank == 0:
        convert_checkpoint(orig, conv, tp, pp, include_optimizer=True, log=lambda *_: None)
        rank_dirs = sorted(d for d in os.listdir(os.path.join(conv, "iter_0000004"))
                           if d.startswith("mp_rank_"))
        f = torch.load(os.path.join(conv, "iter_0000004", rank_dirs[-1], "model_optim_rng.pt"),
                       weights_only=True)
        opt = f["optimizer"]
        state = opt["optimizer"]["state"]
        masters = opt.get("fp32_from_fp16_params")
        info = {"rank_dirs": rank_dirs, "steps": sorted({float(s["step"]) for s in state.values()}),
                "n_state": len(state), "n_params": len(f["model"]),
                "n_masters": None if masters is None else len(masters),
                "distributed": f["config"]["parallel"]["distributed_optimizer"],
                "moments_nonzero": all(s["exp_avg_sq"].abs().sum() > 0 for s in state.values())}
    torch.distributed.barrier()
    resumed = run_pretrain(reshard_overrides(prefix, tp, pp, **{
        "training.train_iters": 6, "checkpoint.load": conv, "training.precision": precision}))
    reset_layout()
    return {"straight": straight["train_losses"], "resumed": resumed["train_losses"],
            "info": info}


def test_distributed_optimizer_checkpoint_with_optimizer(tmp_path):
    results = run_distributed(_runs, 2, str(tmp_path), timeout=300)
    for name, dirs, half, rel in (("fp32_tp2", ["mp_rank_00", "mp_rank_01"], False, 1e-5),
                                  ("bf16_tp1", ["mp_rank_00"], True, 1e-6)):
        info = results[0][name]["info"]
        assert info["rank_dirs"] == dirs, name
        assert info["distributed"] is False, name  # written in the plain optimizer's format
        assert info["n_state"] == info["n_params"] and info["moments_nonzero"], name
        # bf16: an fp32 master for every param (MixedPrecisionOptimizer's format)
        assert info["n_masters"] == (info["n_params"] if half else None), name
        assert info["steps"] == [4.0], name  # carried from the shards, not a fresh Adam
        for r in results:
            straight, resumed = r[name]["straight"], r[name]["resumed"]
            assert sorted(straight) == sorted(resumed) == [5, 6], name
            for it in (5, 6):
                assert resumed[it] == pytest.approx(straight[it], rel=rel), \
                    (name, it, resumed, straight)


def test_mixed_dtype_distributed_state_is_refused(tmp_path):
    """More than one param dtype means several grad buffers per chunk: refused in one line."""
    from types import SimpleNamespace

    from megatron.checkpoint import CheckpointError
    from megatron.checkpoint.reshard import plain_state_from_distributed
    rank_dir = tmp_path / "iter_0000004" / "mp_rank_00"
    rank_dir.mkdir(parents=True)
    torch.save({}, rank_dir / "distrib_optim_dp_000.pt")
    chunk = {"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(2, 2, dtype=torch.bfloat16)}
    shards = SimpleNamespace(root=str(tmp_path), iteration=4, pp=1,
                             chunk_states=lambda tp_rank, pp_rank: [chunk])
    with pytest.raises(CheckpointError) as e:
        plain_state_from_distributed(shards, 0, 0)
    assert "\n" not in str(e.value)
    assert "['torch.bfloat16', 'torch.float32']" in str(e.value), str(e.value)
