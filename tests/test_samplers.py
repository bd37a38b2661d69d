"""The pretraining sampler: Megatron's DP order, exact resume, and the data loader."""
import numpy as np
import pytest
import torch

from megatron.data.samplers import MegatronPretrainingSampler, build_pretraining_data_loader


class Counting:
    """Sample i holds tokens i*10 .. i*10+3."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        base = np.arange(i * 10, i * 10 + 4, dtype=np.int64)
        return {"tokens": base, "labels": base + 1, "loss_mask": np.ones(4, np.float32),
                "position_ids": np.arange(4, dtype=np.int64)}


def batches(total, consumed, mbs, rank, dp):
    return list(MegatronPretrainingSampler(total, consumed, mbs, rank, dp))


def test_megatron_order_and_drop_last():
    # DP=2, micro batch 3: each group of 6 consecutive samples is [rank0 | rank1].
    assert batches(14, 0, 3, 0, 2) == [[0, 1, 2], [6, 7, 8]]
    assert batches(14, 0, 3, 1, 2) == [[3, 4, 5], [9, 10, 11]]
    assert len(MegatronPretrainingSampler(14, 0, 3, 1, 2)) == 2


@pytest.mark.parametrize("total,mbs,dp", [(50, 2, 1), (61, 2, 2), (97, 3, 4), (40, 1, 3)])
def test_resume_anywhere_equals_uninterrupted_and_ranks_partition_dp1(total, mbs, dp):
    full = {r: batches(total, 0, mbs, r, dp) for r in range(dp)}
    group = mbs * dp
    # Together, the ranks' micro batches of one step are DP=1's consecutive samples.
    single = [i for b in batches(total, 0, group, 0, 1) for i in b]
    interleaved = [i for step in zip(*full.values()) for b in step for i in b]
    assert interleaved == single
    # Resuming after any number of consumed global batches, or a step's worth of any
    # size in samples (global batch a multiple of the DP group), gives the same tail.
    for steps in range(len(full[0]) + 1):
        consumed = steps * group
        if consumed >= total:
            break
        for r in range(dp):
            assert batches(total, consumed, mbs, r, dp) == full[r][steps:]


def test_invalid_arguments_are_clear():
    with pytest.raises(ValueError, match="consumed_samples 100 .* 100 samples"):
        MegatronPretrainingSampler(100, 100, 2, 0, 1)
    with pytest.raises(ValueError, match="data_parallel_rank 2 .* size of 2"):
        MegatronPretrainingSampler(100, 0, 2, 2, 2)


def test_data_loader_yields_tensor_batches_and_resumes():
    ds = Counting(40)
    loader = build_pretraining_data_loader(ds, 0, 2, 1, 2)
    got = list(loader)
    assert len(got) == 10
    first = got[0]
    assert set(first) == {"tokens", "labels", "loss_mask", "position_ids"}
    assert first["tokens"].shape == (2, 4) and first["tokens"].dtype == torch.int64
    assert first["loss_mask"].dtype == torch.float32
    assert first["tokens"][:, 0].tolist() == [20, 30]  # samples 2 and 3 on rank 1
    resumed = list(build_pretraining_data_loader(ds, 12, 2, 1, 2))
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(resumed, got[3:]))
    assert len(resumed) == len(got) - 3
    assert build_pretraining_data_loader(None, 0, 2, 0, 1) is None
