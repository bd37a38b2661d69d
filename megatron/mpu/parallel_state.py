"""Process groups for tensor, pipeline and data parallelism, and their getters.

The one piece of module-level state in the framework. ``initialize_model_parallel``
splits the world of ``tp * pp * dp`` ranks the way Megatron-LM does:

- tensor-parallel (TP) groups are blocks of ``tp`` adjacent global ranks, so a
  TP group stays inside a node (its all-reduces are the busiest);
- pipeline (PP) groups take every ``world / pp``-th rank;
- data-parallel (DP) groups join the ranks of one pipeline stage that hold the
  same TP rank;
- model-parallel groups are the ``tp * pp`` ranks holding one model replica;
- the embedding group of a pipeline is its first and last stage (their tied
  word-embedding grads are summed).

Until it is initialized (single-process unit tests build models without any
process group) every world size is 1, every rank 0, every stage first and last,
and every group ``None``; the collectives in ``mappings`` skip groups of one.
"""
import torch

from . import collectives

_TENSOR_MODEL_PARALLEL_GROUP = None
_PIPELINE_MODEL_PARALLEL_GROUP = None
_DATA_PARALLEL_GROUP = None
_MODEL_PARALLEL_GROUP = None
_EMBEDDING_GROUP = None

# Global ranks of this rank's groups, computed once at initialization so that
# getters called in hot loops never query torch.distributed.
_TENSOR_MODEL_PARALLEL_GLOBAL_RANKS = None
_PIPELINE_GLOBAL_RANKS = None
_DATA_PARALLEL_GLOBAL_RANKS = None
_MODEL_PARALLEL_GLOBAL_RANKS = None
_EMBEDDING_GLOBAL_RANKS = None

_VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = None
_VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = None

_GLOBAL_RANK = 0


class ModelParallelConfigError(ValueError):
    """A parallel layout that does not fit the world of processes."""


def initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                              virtual_pipeline_model_parallel_size=None):
    """Build the TP, PP, DP, model-parallel and embedding groups.

    Needs an initialized ``torch.distributed`` default group (gloo or nccl).
    Every rank creates every group, in the same order, as ``new_group`` demands.
    """
    global _TENSOR_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP
    global _MODEL_PARALLEL_GROUP, _EMBEDDING_GROUP
    global _TENSOR_MODEL_PARALLEL_GLOBAL_RANKS, _PIPELINE_GLOBAL_RANKS, _DATA_PARALLEL_GLOBAL_RANKS
    global _MODEL_PARALLEL_GLOBAL_RANKS, _EMBEDDING_GLOBAL_RANKS
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK, _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    global _GLOBAL_RANK

    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError("initialize_model_parallel needs torch.distributed to be initialized "
                           "first (megatron.initialize does it)")
    if model_parallel_is_initialized():
        raise RuntimeError("model parallel groups are already initialized; call "
                           "destroy_model_parallel() before initializing them again")

    tp, pp = int(tensor_model_parallel_size), int(pipeline_model_parallel_size)
    world_size = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    if tp < 1 or pp < 1:
        raise ModelParallelConfigError(
            f"tensor_model_parallel_size ({tp}) and pipeline_model_parallel_size ({pp}) "
            f"must be at least 1")
    if world_size % (tp * pp) != 0:
        raise ModelParallelConfigError(
            f"world size ({world_size}) is not divisible by tensor_model_parallel_size ({tp}) "
            f"x pipeline_model_parallel_size ({pp}) = {tp * pp}")
    vpp = virtual_pipeline_model_parallel_size
    if vpp is not None:
        vpp = int(vpp)
        if vpp < 1:
            raise ModelParallelConfigError(
                f"virtual_pipeline_model_parallel_size ({vpp}) must be at least 1")
        if pp < 2 and vpp > 1:
            raise ModelParallelConfigError(
                f"virtual_pipeline_model_parallel_size ({vpp}) needs "
                f"pipeline_model_parallel_size > 1 (got {pp})")
    dp = world_size // (tp * pp)
    ranks_per_stage = world_size // pp

    # The subgroups wait as long as the default group (training.distributed_timeout_minutes),
    # not torch's per-backend default.
    timeout = collectives.default_timeout()

    def new_group(ranks):
        return torch.distributed.new_group(ranks, timeout=timeout)

    # Data-parallel groups: same stage, same TP rank.
    dp_groups = []
    for stage in range(pp):
        start = stage * ranks_per_stage
        for t in range(tp):
            dp_groups.append(list(range(start + t, start + ranks_per_stage, tp)))
    for ranks in dp_groups:
        group = new_group(ranks)
        if rank in ranks:
            _DATA_PARALLEL_GROUP, _DATA_PARALLEL_GLOBAL_RANKS = group, ranks

    # Model-parallel groups: every TP and PP rank of one data-parallel replica.
    for d in range(dp):
        ranks = sorted(g[d] for g in dp_groups)
        group = new_group(ranks)
        if rank in ranks:
            _MODEL_PARALLEL_GROUP, _MODEL_PARALLEL_GLOBAL_RANKS = group, ranks

    # Tensor-parallel groups: adjacent ranks.
    for i in range(world_size // tp):
        ranks = list(range(i * tp, (i + 1) * tp))
        group = new_group(ranks)
        if rank in ranks:
            _TENSOR_MODEL_PARALLEL_GROUP, _TENSOR_MODEL_PARALLEL_GLOBAL_RANKS = group, ranks

    # Pipeline groups (stride world / pp) and their embedding groups (first and
    # last stage).
    for i in range(ranks_per_stage):
        ranks = list(range(i, world_size, ranks_per_stage))
        group = new_group(ranks)
        if rank in ranks:
            _PIPELINE_MODEL_PARALLEL_GROUP, _PIPELINE_GLOBAL_RANKS = group, ranks
        embedding_ranks = [ranks[0], ranks[-1]] if len(ranks) > 1 else ranks
        group = new_group(embedding_ranks)
        if rank in embedding_ranks:
            _EMBEDDING_GROUP = group
        if rank in ranks:
            _EMBEDDING_GLOBAL_RANKS = embedding_ranks

    _GLOBAL_RANK = rank
    if vpp is not None:
        _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = 0
        _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = vpp


def model_parallel_is_initialized():
    """True once ``initialize_model_parallel`` has built the groups."""
    return _TENSOR_MODEL_PARALLEL_GROUP is not None


def destroy_model_parallel():
    """Forget every group and virtual-pipeline setting (tests re-initialize)."""
    global _TENSOR_MODEL_PARALLEL_GROUP, _PIPELINE_MODEL_PARALLEL_GROUP, _DATA_PARALLEL_GROUP
    global _MODEL_PARALLEL_GROUP, _EMBEDDING_GROUP
    global _TENSOR_MODEL_PARALLEL_GLOBAL_RANKS, _PIPELINE_GLOBAL_RANKS, _DATA_PARALLEL_GLOBAL_RANKS
    global _MODEL_PARALLEL_GLOBAL_RANKS, _EMBEDDING_GLOBAL_RANKS
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK, _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    global _GLOBAL_RANK
    _TENSOR_MODEL_PARALLEL_GROUP = _PIPELINE_MODEL_PARALLEL_GROUP = _DATA_PARALLEL_GROUP = None
    _MODEL_PARALLEL_GROUP = _EMBEDDING_GROUP = None
    _TENSOR_MODEL_PARALLEL_GLOBAL_RANKS = _PIPELINE_GLOBAL_RANKS = None
    _DATA_PARALLEL_GLOBAL_RANKS = _MODEL_PARALLEL_GLOBAL_RANKS = _EMBEDDING_GLOBAL_RANKS = None
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = None
    _GLOBAL_RANK = 0


# ---- groups -----------------------------------------------------------------

def get_tensor_model_parallel_group():
    """This rank's tensor-parallel group (None when not initialized)."""
    return _TENSOR_MODEL_PARALLEL_GROUP


def get_pipeline_model_parallel_group():
    """This rank's pipeline group (None when not initialized)."""
    return _PIPELINE_MODEL_PARALLEL_GROUP


def get_data_parallel_group():
    """This rank's data-parallel group (None when not initialized)."""
    return _DATA_PARALLEL_GROUP


def get_model_parallel_group():
    """The TP x PP ranks of this rank's model replica (None when not initialized)."""
    return _MODEL_PARALLEL_GROUP


def get_embedding_group():
    """First and last stage of this rank's pipeline; None on middle stages and
    when not initialized."""
    return _EMBEDDING_GROUP


# ---- world sizes and ranks --------------------------------------------------

def _index(ranks):
    return 0 if ranks is None else ranks.index(_GLOBAL_RANK)


def get_tensor_model_parallel_world_size():
    """Number of TP ranks (1 when not initialized)."""
    return 1 if _TENSOR_MODEL_PARALLEL_GLOBAL_RANKS is None else len(_TENSOR_MODEL_PARALLEL_GLOBAL_RANKS)


def get_tensor_model_parallel_rank():
    """This rank's index in its TP group (0 when not initialized)."""
    return _index(_TENSOR_MODEL_PARALLEL_GLOBAL_RANKS)


def get_pipeline_model_parallel_world_size():
    """Number of pipeline stages (1 when not initialized)."""
    return 1 if _PIPELINE_GLOBAL_RANKS is None else len(_PIPELINE_GLOBAL_RANKS)


def get_pipeline_model_parallel_rank():
    """This rank's pipeline stage (0 when not initialized)."""
    return _index(_PIPELINE_GLOBAL_RANKS)


def get_data_parallel_world_size():
    """Number of data-parallel replicas (1 when not initialized)."""
    return 1 if _DATA_PARALLEL_GLOBAL_RANKS is None else len(_DATA_PARALLEL_GLOBAL_RANKS)


def get_data_parallel_rank():
    """This rank's index among the data-parallel replicas (0 when not initialized)."""
    return _index(_DATA_PARALLEL_GLOBAL_RANKS)


def get_model_parallel_world_size():
    """TP x PP (1 when not initialized)."""
    return 1 if _MODEL_PARALLEL_GLOBAL_RANKS is None else len(_MODEL_PARALLEL_GLOBAL_RANKS)


def get_tensor_model_parallel_global_ranks():
    """Global ranks of this rank's TP group ([global rank] when not initialized)."""
    return list(_TENSOR_MODEL_PARALLEL_GLOBAL_RANKS or [_GLOBAL_RANK])


def get_pipeline_model_parallel_global_ranks():
    """Global ranks of this rank's pipeline, first stage first."""
    return list(_PIPELINE_GLOBAL_RANKS or [_GLOBAL_RANK])


def get_data_parallel_global_ranks():
    """Global ranks of this rank's data-parallel group."""
    return list(_DATA_PARALLEL_GLOBAL_RANKS or [_GLOBAL_RANK])


def get_embedding_global_ranks():
    """Global ranks of this rank's embedding group (first and last stage)."""
    return list(_EMBEDDING_GLOBAL_RANKS or [_GLOBAL_RANK])


def get_tensor_model_parallel_src_rank():
    """Global rank of TP rank 0 in this rank's TP group (for broadcasts)."""
    return get_tensor_model_parallel_global_ranks()[0]


def get_data_parallel_src_rank():
    """Global rank of DP rank 0 in this rank's DP group."""
    return get_data_parallel_global_ranks()[0]


def get_pipeline_model_parallel_first_rank():
    """Global rank of the first stage of this rank's pipeline."""
    return get_pipeline_model_parallel_global_ranks()[0]


def get_pipeline_model_parallel_last_rank():
    """Global rank of the last stage of this rank's pipeline."""
    return get_pipeline_model_parallel_global_ranks()[-1]


def get_pipeline_model_parallel_next_rank():
    """Global rank of the next stage (wraps around from the last to the first)."""
    ranks = get_pipeline_model_parallel_global_ranks()
    return ranks[(get_pipeline_model_parallel_rank() + 1) % len(ranks)]


def get_pipeline_model_parallel_prev_rank():
    """Global rank of the previous stage (wraps around from the first to the last)."""
    ranks = get_pipeline_model_parallel_global_ranks()
    return ranks[(get_pipeline_model_parallel_rank() - 1) % len(ranks)]


# ---- pipeline stages ----------------------------------------------------------

def get_virtual_pipeline_model_parallel_rank():
    """Index of the model chunk being run (None without virtual pipelining)."""
    return _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK


def set_virtual_pipeline_model_parallel_rank(rank):
    """Select the model chunk that the stage getters refer to."""
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK = rank


def get_virtual_pipeline_model_parallel_world_size():
    """Model chunks per rank (None without virtual pipelining)."""
    return _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE


def set_virtual_pipeline_model_parallel_world_size(world_size):
    """Set the number of model chunks per rank."""
    global _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = world_size


def is_pipeline_first_stage(ignore_virtual=False):
    """True on the stage (and, with virtual pipelining, the chunk) that holds the input."""
    if not ignore_virtual and _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE is not None \
            and _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK not in (None, 0):
        return False
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage(ignore_virtual=False):
    """True on the stage (and, with virtual pipelining, the chunk) that computes the loss."""
    vpp = _VIRTUAL_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    if not ignore_virtual and vpp is not None \
            and _VIRTUAL_PIPELINE_MODEL_PARALLEL_RANK not in (None, vpp - 1):
        return False
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


def is_rank_in_embedding_group(ignore_virtual=False):
    """True if this rank holds a word embedding of its pipeline (first or last stage).

    With virtual pipelining and ``ignore_virtual=False`` only the chunk that
    actually holds the embedding counts.
    """
    ranks = get_embedding_global_ranks()
    if _GLOBAL_RANK not in ranks:
        return False
    if ignore_virtual:
        return True
    if _GLOBAL_RANK == ranks[0] and is_pipeline_first_stage(ignore_virtual=False):
        return True
    if _GLOBAL_RANK == ranks[-1] and is_pipeline_last_stage(ignore_virtual=False):
        return True
    return False
