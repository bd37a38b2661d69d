"""Resumable data-parallel batch sampling and the pretraining data loader.

Samples are served in order from ``consumed_samples``: each group of
``micro_batch_size * data_parallel_size`` consecutive sample indices is one micro
batch per DP rank, rank r taking slice r (Megatron's order). A run resumed with the
``consumed_samples`` of its checkpoint sees exactly the batches the uninterrupted run
would have seen.
"""
import numpy as np
import torch


class MegatronPretrainingSampler:
    """Batch sampler: yields this DP rank's micro batches of sample indices, in order.

    A trailing group too short to give every rank a full micro batch is dropped.
    """

    def __init__(self, total_samples, consumed_samples, micro_batch_size, data_parallel_rank,
                 data_parallel_size):
        if total_samples <= 0:
            raise ValueError(f"no samples to draw from (total_samples={total_samples})")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        if data_parallel_size <= 0 or not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"data_parallel_rank {data_parallel_rank} outside a data-parallel size "
                             f"of {data_parallel_size}")
        if not 0 <= consumed_samples < total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} is outside the dataset's "
                             f"{total_samples} samples: the dataset is exhausted or smaller than "
                             f"the run that saved the checkpoint")
        self.total_samples = int(total_samples)
        self.consumed_samples = int(consumed_samples)
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.data_parallel_size = int(data_parallel_size)

    def __len__(self):
        group = self.micro_batch_size * self.data_parallel_size
        return (self.total_samples - self.consumed_samples) // group

    def __iter__(self):
        group = self.micro_batch_size * self.data_parallel_size
        first = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        for start in range(first, first + len(self) * group, group):
            yield list(range(start, start + self.micro_batch_size))


def collate_samples(samples):
    """Stack a list of sample dicts of numpy arrays into a dict of torch tensors ``[b, s]``."""
    return {key: torch.from_numpy(np.stack([s[key] for s in samples])) for key in samples[0]}


def build_pretraining_data_loader(dataset, consumed_samples, micro_batch_size, data_parallel_rank,
                                  data_parallel_size, num_workers=0, pin_memory=False):
    """A DataLoader over ``dataset`` yielding this DP rank's micro batches from ``consumed_samples``.

    ``pin_memory=True`` (for a CUDA target device) puts batches in page-locked
    memory so the ``non_blocking`` host-to-device copies are asynchronous.
    Returns None when ``dataset`` is None (an empty split).
    """
    if dataset is None:
        return None
    sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                         data_parallel_rank, data_parallel_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       collate_fn=collate_samples, pin_memory=pin_memory,
                                       persistent_workers=num_workers > 0)
