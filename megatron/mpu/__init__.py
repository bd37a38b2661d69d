"""The parallel core: process groups, communication operators, TP layers, RNG.

``megatron.mpu.distributed`` (DDP grad buffer) and
``megatron.mpu.p2p_communication`` (pipeline send/recv) are imported directly
by their callers, not from here.
"""
from .parallel_state import (
    ModelParallelConfigError,
    destroy_model_parallel,
    get_data_parallel_global_ranks,
    get_data_parallel_group,
    get_data_parallel_rank,
    get_data_parallel_src_rank,
    get_data_parallel_world_size,
    get_embedding_global_ranks,
    get_embedding_group,
    get_model_parallel_group,
    get_model_parallel_world_size,
    get_pipeline_model_parallel_first_rank,
    get_pipeline_model_parallel_global_ranks,
    get_pipeline_model_parallel_group,
    get_pipeline_model_parallel_last_rank,
    get_pipeline_model_parallel_next_rank,
    get_pipeline_model_parallel_prev_rank,
    get_pipeline_model_parallel_rank,
    get_pipeline_model_parallel_world_size,
    get_tensor_model_parallel_global_ranks,
    get_tensor_model_parallel_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_src_rank,
    get_tensor_model_parallel_world_size,
    get_virtual_pipeline_model_parallel_rank,
    get_virtual_pipeline_model_parallel_world_size,
    initialize_model_parallel,
    is_pipeline_first_stage,
    is_pipeline_last_stage,
    is_rank_in_embedding_group,
    model_parallel_is_initialized,
    set_virtual_pipeline_model_parallel_rank,
    set_virtual_pipeline_model_parallel_world_size,
)
from .collectives import (
    RanksFailedError,
    all_gather_object,
    all_reduce,
    barrier,
    broadcast,
    collective_device,
    default_timeout,
    destroy_process_group,
    fail_together,
    get_backend,
    get_global_rank,
    get_global_world_size,
    get_group_world_size,
    init_process_group,
    is_collective_timeout,
    is_distributed,
    is_peer_lost,
)
from .collective_log import CollectiveLog
from .rendezvous import launch_round_store
from .mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from .layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    copy_tensor_model_parallel_attributes,
    set_defaults_if_not_set_tensor_model_parallel_attributes,
    set_tensor_model_parallel_attributes,
    stride_merge,
    stride_shard,
)
from .cross_entropy import vocab_parallel_cross_entropy
from .random import (
    RNGStatesTracker,
    checkpoint,
    get_rng_states,
    get_rng_tracker,
    model_parallel_seed,
    set_rng_states,
)
from .utils import (
    divide,
    param_is_not_tensor_parallel_duplicate,
    split_tensor_along_last_dim,
    vocab_range_from_global_vocab_size,
    vocab_range_from_per_partition_vocab_size,
)
