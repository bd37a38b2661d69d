"""Exact resume: 2N iterations == N, exit, resume, N more, bit for bit, at DP=1 and DP=2.

Each launch also checks the layout/shape mismatch error and keep_last_n pruning.
"""
import os

import pytest
import torch

from tests.dist_harness import run_distributed
from tests.helpers.training import make_corpus, run_pretrain, tiny_overrides

N = 4


def _resume_runs(workdir, world):
    rank = torch.distributed.get_rank()
    prefix = os.path.join(workdir, "corpus")
    if rank == 0:
        make_corpus(prefix)
    torch.distributed.barrier()
    # Dropout on, so the RNG states must be restored too; eval every 4 iterations.
    common = {"training.train_iters": 2 * N, "training.eval_interval": 3,
              "model.hidden_dropout": 0.1, "model.attention_dropout": 0.1,
              # at DP=2 the sharded (ZeRO-1) optimizer: one state file per DP rank
              "parallel.distributed_optimizer": world > 1}
    straight_dir = os.path.join(workdir, f"straight{world}")
    split_dir = os.path.join(workdir, f"split{world}")
    straight = run_pretrain(tiny_overrides(prefix, **common, **{"checkpoint.save": straight_dir}))
    first = run_pretrain(tiny_overrides(prefix, **common, **{
        "checkpoint.save": split_dir, "training.exit_interval": N, "checkpoint.save_interval": 2,
        "checkpoint.keep_last_n": 1}))
    kept = sorted(os.listdir(split_dir))
    shard_files = sorted(os.listdir(os.path.join(split_dir, f"iter_{N:07d}", "mp_rank_00")))
    second = run_pretrain(tiny_overrides(prefix, **common, **{
        "checkpoint.save": split_dir, "checkpoint.load": split_dir}))

    from megatron.checkpoint import CheckpointError
    mismatch = None
    try:
        if world > 1:  # the layout check needs one launch only
            raise CheckpointError("skipped")
        run_pretrain(tiny_overrides(prefix, **common, **{
            "checkpoint.load": split_dir, "model.hidden_size": 64}))
    except CheckpointError as e:
        mismatch = str(e)

    def model_of(root):
        it = open(os.path.join(root, "latest_checkpointed_iteration.txt")).read().strip()
        path = os.path.join(root, f"iter_{int(it):07d}", "mp_rank_00", "model_optim_rng.pt")
        return torch.load(path, weights_only=True)
    same_params = None
    if rank == 0:
        a, b = model_of(straight_dir), model_of(split_dir)
        same_params = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
        same_params = same_params and a["consumed_samples"] == b["consumed_samples"]
    return {"straight": straight["train_losses"], "first": first["train_losses"],
            "first_exit": first["exit_reason"], "second": second["train_losses"],
            "kept": kept, "shard_files": shard_files, "mismatch": mismatch, "same_params": same_params}


@pytest.mark.parametrize("world", [1, 2])
def test_exact_resume(tmp_path, world):
    results = run_distributed(_resume_runs, world, str(tmp_path), world)
    for r in results:
        assert sorted(r["first"]) == list(range(1, N + 1)) and "exit_interval" in r["first_exit"]
        assert sorted(r["second"]) == list(range(N + 1, 2 * N + 1))
        resumed = {**r["first"], **r["second"]}
        for i in range(1, 2 * N + 1):
            assert resumed[i] == r["straight"][i], (world, i, resumed[i], r["straight"][i])
        # keep_last_n=1 with saves at 2 and 4 leaves 4
        assert r["kept"] == ["iter_0000004", "latest_checkpointed_iteration.txt"]
        expected = ["model_optim_rng.pt"] + [f"distrib_optim_dp_{d:03d}.pt" for d in range(world)
                                             if world > 1]
        assert r["shard_files"] == sorted(expected)
    if world == 1:
        mismatch = results[0]["mismatch"]
        assert mismatch is not None and "64" in mismatch and "32" in mismatch, mismatch
    assert results[0]["same_params"] is True


def _optimizer_common(prefix, **extra):
    return tiny_overrides(prefix, **{"training.train_iters": 2 * N, "training.eval_iters": 1,
                                     **extra})


def _dp2_source_runs(workdir):
    """DP=2 distributed-optimizer run saved at N; then a plain-optimizer run loading it
    (error), and resumes from a copy without optimizer state (fp32 and bf16)."""
    import shutil
    from megatron import mpu
    from megatron.checkpoint import CheckpointError
    rank = torch.distributed.get_rank()
    prefix = os.path.join(workdir, "corpus")
    if rank == 0:
        make_corpus(prefix)
    torch.distributed.barrier()
    src, bare = os.path.join(workdir, "dp2"), os.path.join(workdir, "bare")
    straight = run_pretrain(_optimizer_common(prefix, **{
        "parallel.distributed_optimizer": True, "checkpoint.save": src,
        "checkpoint.save_interval": N}))
    torch.distributed.barrier()  # every rank has read the latest file before it changes
    if rank == 0:
        # Resume from iteration N; `bare` is that checkpoint without its optimizer
        # state, as tools/checkpoint_convert.py writes it without --include-optimizer.
        with open(os.path.join(src, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(f"{N}\n")
        shutil.copytree(os.path.join(src, f"iter_{N:07d}"), os.path.join(bare, f"iter_{N:07d}"))
        shutil.copy(os.path.join(src, "latest_checkpointed_iteration.txt"), bare)
        rank_dir = os.path.join(bare, f"iter_{N:07d}", "mp_rank_00")
        for name in os.listdir(rank_dir):
            if name.startswith("distrib_optim"):
                os.remove(os.path.join(rank_dir, name))
        # ...and its manifest lists the files that are left, as the converter's does.
        from megatron.checkpoint.integrity import read_manifest, write_manifest
        manifest = read_manifest(os.path.dirname(rank_dir))
        write_manifest(manifest.it_dir, N, {k: v for k, v in manifest.files.items()
                                            if "distrib_optim" not in k})
    torch.distributed.barrier()
    wrong_kind = None
    try:
        run_pretrain(_optimizer_common(prefix, **{"checkpoint.load": src}))
    except CheckpointError as e:
        wrong_kind = str(e)
    mpu.destroy_model_parallel()
    # bf16: the fp32 masters of the mixed-precision and of the distributed
    # optimizer are copies that must be refreshed from the loaded weights.
    fresh = {kind: run_pretrain(_optimizer_common(prefix, **{
        "training.precision": "bf16", "parallel.distributed_optimizer": kind == "distributed",
        "checkpoint.load": bare})) for kind in ("plain", "distributed")}
    return {"straight": straight["train_losses"], "wrong_kind": wrong_kind,
            "fresh": {k: h["train_losses"] for k, h in fresh.items()},
            "fresh_iter": [h["iteration"] for h in fresh.values()]}


def _dp1_resharding_runs(workdir):
    """The DP=2 shards re-sharded at DP=1; a plain checkpoint into a distributed optimizer."""
    from megatron import mpu
    from megatron.checkpoint import CheckpointError
    prefix = os.path.join(workdir, "corpus")
    resharded = run_pretrain(_optimizer_common(prefix, **{
        "parallel.distributed_optimizer": True, "checkpoint.load": os.path.join(workdir, "dp2")}))
    plain = os.path.join(workdir, "plain")
    run_pretrain(_optimizer_common(prefix, **{"training.train_iters": 2, "checkpoint.save": plain}))
    wrong_kind = None
    try:
        run_pretrain(_optimizer_common(prefix, **{
            "parallel.distributed_optimizer": True, "checkpoint.load": plain}))
    except CheckpointError as e:
        wrong_kind = str(e)
    mpu.destroy_model_parallel()
    return {"resharded": resharded["train_losses"], "wrong_kind": wrong_kind}


def test_resume_without_optimizer_state_resharded_and_wrong_kind(tmp_path):
    workdir = str(tmp_path)
    first = run_distributed(_dp2_source_runs, 2, workdir)[0]
    straight = first["straight"]
    # (c) distributed-optimizer shards into a plain optimizer: converted, no error
    # (the converted state is checked in tests/test_optimizer_switch.py)
    assert first["wrong_kind"] is None, first["wrong_kind"]
    # (a) no optimizer state: the loaded weights give about the straight run's loss
    # at N+1 (same weights in bf16, same batch), then a fresh Adam takes other steps;
    # without refreshed masters the first step would copy the initial weights back
    # and the loss would jump to about ln(64) = 4.16
    assert first["fresh_iter"] == [2 * N, 2 * N]
    for kind, fresh in first["fresh"].items():
        assert sorted(fresh) == list(range(N + 1, 2 * N + 1)), kind
        assert fresh[N + 1] == pytest.approx(straight[N + 1], rel=2e-2), (kind, fresh, straight)
        assert fresh[N + 2] != straight[N + 2]
        for i in range(N + 2, 2 * N + 1):
            assert fresh[i] < straight[1] - 0.2, (kind, i, fresh, straight)
    second = run_distributed(_dp1_resharding_runs, 1, workdir)[0]
    # (b) DP=2 shards re-sharded at DP=1: Adam moments and masters continue exactly
    # (same global batch; DP=1 vs DP=2 differ only by summation order)
    for i in range(N + 1, 2 * N + 1):
        assert second["resharded"][i] == pytest.approx(straight[i], rel=1e-5), (i, second, straight)
    # a plain checkpoint into a distributed optimizer: converted, no error
    assert second["wrong_kind"] is None, second["wrong_kind"]
