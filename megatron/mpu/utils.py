"""Small helpers shared by the mpu modules: divisibility, splits, vocab ranges."""
import torch

from . import parallel_state


def ensure_divisibility(numerator, denominator, what="value"):
    """Raise a one-line ValueError unless ``denominator`` divides ``numerator``."""
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by {denominator}")


def divide(numerator, denominator, what="value"):
    """``numerator // denominator``, checking that the division is exact."""
    ensure_divisibility(numerator, denominator, what)
    return numerator // denominator


def split_tensor_along_last_dim(tensor, num_partitions, contiguous_split_chunks=False):
    """Split ``tensor`` into ``num_partitions`` equal chunks along its last dim."""
    last_dim_size = divide(tensor.size(-1), num_partitions, "last dimension")
    chunks = torch.split(tensor, last_dim_size, dim=-1)
    if contiguous_split_chunks:
        return tuple(chunk.contiguous() for chunk in chunks)
    return chunks


def vocab_range_from_per_partition_vocab_size(per_partition_vocab_size, rank):
    """[first, last) vocabulary ids held by TP ``rank``."""
    first = rank * per_partition_vocab_size
    return first, first + per_partition_vocab_size


def vocab_range_from_global_vocab_size(global_vocab_size, rank, world_size):
    """[first, last) vocabulary ids held by TP ``rank`` of ``world_size``."""
    per_partition = divide(global_vocab_size, world_size, "vocabulary size")
    return vocab_range_from_per_partition_vocab_size(per_partition, rank)


def param_is_not_tensor_parallel_duplicate(param):
    """True for a TP shard, or for a TP-replicated parameter on TP rank 0.

    Norms and parameter counts use it so that replicated parameters count once.
    """
    return bool(getattr(param, "tensor_model_parallel", False)) or \
        parallel_state.get_tensor_model_parallel_rank() == 0
