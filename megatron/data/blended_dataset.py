"""A weighted, deterministic blend of several datasets.

Sample i comes from the dataset whose ``weight * i`` most exceeds the samples it has
already given (Megatron's greedy), so at every point of the stream each dataset's
share is within one sample of its weight. The two index arrays are cached as ``.npy``.
"""
import os

import numpy as np

from megatron.data import index_builders

_INDEX_VERSION = 1


class BlendedDataset:
    """``size`` samples drawn from ``datasets`` in proportion to ``weights``.

    Each dataset should carry a ``description`` dict (GPTDataset does) so that the
    cached indices are named by everything that shapes them; ``cache_dir`` defaults
    to the first dataset's cache directory.
    """

    def __init__(self, datasets, weights, size, cache_dir=None):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"BlendedDataset needs one weight per dataset: {len(datasets)} datasets, "
                             f"{len(weights)} weights")
        if len(datasets) > np.iinfo(np.int16).max:
            raise ValueError(f"too many datasets to blend: {len(datasets)}")
        weights = [float(w) for w in weights]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"blend weights {weights}: must be non-negative with a positive sum")
        total = sum(weights)
        self.datasets = list(datasets)
        self.weights = [w / total for w in weights]
        self.size = int(size)
        self.description = {
            "class": "BlendedDataset", "version": _INDEX_VERSION, "size": self.size,
            "weights": self.weights,
            "datasets": [getattr(d, "description", {"len": len(d), "type": type(d).__name__})
                         for d in self.datasets],
        }
        self.hash = index_builders.description_hash(self.description)
        if cache_dir is None:
            cache_dir = getattr(self.datasets[0], "cache_dir", None)
        names = {"dataset_index": f"{self.hash}-blend-dataset_index.npy",
                 "dataset_sample_index": f"{self.hash}-blend-dataset_sample_index.npy"}
        if cache_dir is None:
            arrays, self.built = self._build(), True
        else:
            arrays, self.built = index_builders.cached_arrays(cache_dir, names, self._build)
        self.cache_dir = cache_dir
        self.dataset_index = arrays["dataset_index"]
        self.dataset_sample_index = arrays["dataset_sample_index"]

    def _build(self):
        dataset_index, dataset_sample_index = index_builders.build_blending_indices(self.weights, self.size)
        counts = np.bincount(dataset_index, minlength=len(self.datasets))
        for d, (count, ds) in enumerate(zip(counts, self.datasets)):
            if count > len(ds):
                raise ValueError(f"blended dataset {d} (weight {self.weights[d]:.4f}) must give {int(count)} "
                                 f"samples but holds {len(ds)}")
        return {"dataset_index": dataset_index, "dataset_sample_index": dataset_sample_index}

    def __len__(self):
        return self.size

    def __getitem__(self, idx):
        if not -self.size <= idx < self.size:
            raise IndexError(f"sample {idx} out of range for {self.size} samples")
        idx %= self.size
        d = int(self.dataset_index[idx])
        return self.datasets[d][int(self.dataset_sample_index[idx])]
