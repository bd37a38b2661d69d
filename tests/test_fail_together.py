"""A failure on some ranks only raises on every rank instead of hanging the others.

One 3-process gloo launch: ``mpu.fail_together`` itself, rank 0 failing while it
builds an index cache, rank 0 failing in the datasets provider, and one rank's
disk "filling up" while a checkpoint is saved (the previous checkpoint stays the
loadable one). Each case is followed by an all-reduce, which shows the ranks are
still in step after the error. The harness fails the test if any rank hangs.
"""
import os

import torch
import torch.distributed as dist

from tests.dist_harness import run_distributed

WORLD = 3


def _error(fn):
    """``(type name, message)`` of what ``fn()`` raised, or None."""
    try:
        fn()
    except Exception as e:  # the test inspects which error each rank saw
        return type(e).__name__, str(e)
    return None


def _in_step():
    """True when every rank reaches this all-reduce (the ranks are still in step)."""
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item() == WORLD


def _worker(tmp):
    from megatron import checkpoint, mpu
    from megatron.config import load_config
    from megatron.data.index_builders import cached_arrays
    from megatron.training import _build_datasets
    from megatron.mpu import fail_together
    import numpy as np

    rank = dist.get_rank()
    out = {}

    def block():
        with fail_together("the test block"):
            if rank == 1:
                raise ValueError("rank 1's own error")
    out["block"] = (_error(block), _in_step())

    def build():
        if dist.get_rank() == 0:
            raise OSError("disk full while building")
        return {"a": np.arange(3)}
    out["index"] = (_error(lambda: cached_arrays(os.path.join(tmp, "cache"), {"a": "a.npy"}, build)),
                    _in_step())

    def provider(cfg, num_samples):
        if dist.get_rank() == 0:
            raise FileNotFoundError("no such data prefix")
        return "datasets"
    cfg = load_config(None, ["checkpoint.save=" + os.path.join(tmp, "ck"), "training.device=cpu",
                                "training.train_iters=10", "training.global_batch_size=3"])
    out["datasets"] = (_error(lambda: _build_datasets(cfg, provider)), _in_step())

    mpu.initialize_model_parallel(WORLD)  # TP=3: every rank writes its own file
    torch.manual_seed(rank)
    chunks = [torch.nn.Linear(4, 4)]
    checkpoint.save_checkpoint(cfg, 1, 8, chunks, None, None)
    real_write = checkpoint.files.atomic_write

    def full_disk_on_rank_2(path, obj):
        if dist.get_rank() == 2:
            raise OSError(28, "No space left on device")
        real_write(path, obj)
    checkpoint.files.atomic_write = full_disk_on_rank_2
    out["save"] = (_error(lambda: checkpoint.save_checkpoint(cfg, 2, 16, chunks, None, None)),
                   _in_step())
    checkpoint.files.atomic_write = real_write
    out["latest"] = checkpoint.read_latest_iteration(cfg.checkpoint.save)
    out["iterations"] = checkpoint.list_checkpoints(cfg.checkpoint.save)
    return out


def test_failures_on_some_ranks_raise_on_every_rank(tmp_path):
    results = run_distributed(_worker, WORLD, str(tmp_path), timeout=120)
    for rank, r in enumerate(results):
        assert all(in_step for _, in_step in (r["block"], r["index"], r["datasets"], r["save"])), rank
        # The failed rank re-raises its own error; the others name it.
        assert r["block"][0] == (("ValueError", "rank 1's own error") if rank == 1 else
                                 ("RanksFailedError", r["block"][0][1]))
        if rank != 1:
            assert "the test block failed on rank 1 " in r["block"][0][1]
        for case, failed, own in (("index", 0, "OSError"), ("datasets", 0, "FileNotFoundError"),
                                  ("save", 2, "OSError")):
            kind, message = r[case][0]
            if rank == failed:
                assert kind == own, (case, rank, message)
            else:
                assert kind == "RanksFailedError" and f"failed on rank {failed} " in message, (case, rank, message)
                assert "\n" not in message
        assert "saving the checkpoint of iteration 2" in results[0]["save"][0][1]
        # The failed save was never renamed into place: iteration 1 is still the one to load.
        assert r["latest"] == 1 and r["iterations"] == [1]
