"""BlendedDataset: the realized mix stays within one sample of the weights, deterministically."""
import os
from types import SimpleNamespace

import numpy as np
import pytest

from megatron.data import index_builders
from megatron.data.blended_dataset import BlendedDataset
from megatron.data.gpt_dataset import build_train_valid_test_datasets
from tests.helpers.data import make_dataset


class Tagged:
    """A dataset whose sample i is (name, i)."""

    def __init__(self, name, n):
        self.name, self.n = name, n
        self.description = {"name": name, "n": n}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        assert 0 <= i < self.n
        return (self.name, i)


def max_deviation(dataset_index, weights):
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    served = np.zeros((len(dataset_index), len(weights)))
    served[np.arange(len(dataset_index)), dataset_index] = 1
    served = np.cumsum(served, axis=0)
    n = np.arange(1, len(dataset_index) + 1)[:, None]
    return float(np.abs(served - weights * n).max())


def test_mix_within_one_sample_at_every_prefix():
    rng = np.random.default_rng(0)
    cases = [[0.3, 0.7], [0.5, 0.5], [0.999, 0.001], [1, 1, 1], [0.8, 0.1, 0.1],
             [0.9, 0.0, 0.1], [0.85, 0.005, 0.1, 0.045]]
    cases += [list(rng.dirichlet(np.ones(k) * a)) for k, a in
              [(3, 0.2), (4, 1.0), (5, 0.3), (6, 5.0), (8, 0.5), (8, 0.1)]]
    for weights in cases:
        size = 3000
        dataset_index, sample_index = index_builders.build_blending_indices(weights, size)
        assert max_deviation(dataset_index, weights) <= 1.0 + 1e-9, weights
        # Each dataset's samples are taken in order 0, 1, 2, ...
        for d in range(len(weights)):
            assert sample_index[dataset_index == d].tolist() == list(range(int((dataset_index == d).sum())))
        for d, w in enumerate(weights):
            if w == 0:
                assert not np.any(dataset_index == d)


def test_blended_dataset_serves_and_caches(tmp_path):
    datasets = [Tagged("a", 400), Tagged("b", 900), Tagged("c", 100)]
    weights = [0.3, 0.6, 0.1]
    blend = BlendedDataset(datasets, weights, 1000, cache_dir=str(tmp_path))
    assert blend.built and len(blend) == 1000
    names = [blend[i][0] for i in range(len(blend))]
    counts = {n: names.count(n) for n in "abc"}
    assert all(abs(counts[n] - w * 1000) <= 1 for n, w in zip("abc", weights))
    again = BlendedDataset(datasets, weights, 1000, cache_dir=str(tmp_path))
    assert not again.built
    assert [again[i] for i in range(1000)] == [blend[i] for i in range(1000)]
    with pytest.raises(ValueError, match="must give .* samples but holds 100"):
        BlendedDataset(datasets, [0.1, 0.1, 0.8], 1000, cache_dir=str(tmp_path))


def test_blended_data_path_builds_a_blend(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    make_dataset(a, num_docs=80, seed=1)
    make_dataset(b, num_docs=80, seed=2)
    cfg = SimpleNamespace(data_path=[0.25, a, 0.75, b], split="90,10,0", data_cache_path=str(tmp_path / "c"),
                          reset_position_ids=False, eod_mask_loss=False)
    train, valid, test = build_train_valid_test_datasets(cfg, 8, 3, [200, 20, 0], 0)
    assert test is None and len(train) == 200 and len(valid) == 20
    assert isinstance(train, BlendedDataset)
    counts = np.bincount(np.asarray(train.dataset_index), minlength=2)
    assert abs(counts[0] - 50) <= 1 and abs(counts[1] - 150) <= 1
    # Every sample equals the corresponding sample of its source dataset.
    for i in range(0, 200, 13):
        d, j = int(train.dataset_index[i]), int(train.dataset_sample_index[i])
        assert np.array_equal(train[i]["tokens"], train.datasets[d][j]["tokens"])
    files = os.listdir(str(tmp_path / "c"))
    assert sum(f.endswith("-blend-dataset_index.npy") for f in files) == 2
