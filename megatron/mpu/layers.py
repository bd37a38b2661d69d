"""Tensor-parallel layers: column- and row-parallel linears, vocab-parallel embedding.

Each layer builds the full master weight on the CPU in fp32, fills it with
``init_method`` (which draws from torch's default CPU generator, seeded by the
caller) and keeps this rank's shard, so a TP=k model starts from exactly the
weights of the TP=1 model. The shard is then moved to ``device`` and cast to
``params_dtype``.
"""
import torch
import torch.nn.functional as F

from . import parallel_state
from .mappings import (_gather_along_first_dim, _reduce_scatter_along_first_dim,
                       copy_to_tensor_model_parallel_region,
                       gather_from_tensor_model_parallel_region,
                       reduce_from_tensor_model_parallel_region,
                       reduce_scatter_to_sequence_parallel_region,
                       scatter_to_tensor_model_parallel_region)
from .utils import vocab_range_from_per_partition_vocab_size

_MODEL_PARALLEL_ATTRIBUTE_DEFAULTS = {
    "tensor_model_parallel": False,
    "partition_dim": -1,
    "partition_stride": 1,
}


def set_tensor_model_parallel_attributes(tensor, is_parallel, dim, stride=1):
    """Mark ``tensor`` as a TP shard split along ``dim`` (or as replicated)."""
    tensor.tensor_model_parallel = bool(is_parallel)
    tensor.partition_dim = dim
    tensor.partition_stride = stride


def set_defaults_if_not_set_tensor_model_parallel_attributes(tensor):
    """Give ``tensor`` the replicated defaults for any attribute it lacks."""
    for name, value in _MODEL_PARALLEL_ATTRIBUTE_DEFAULTS.items():
        if not hasattr(tensor, name):
            setattr(tensor, name, value)


def copy_tensor_model_parallel_attributes(destination, source):
    """Copy the TP attributes of ``source`` (where set) onto ``destination``."""
    for name in _MODEL_PARALLEL_ATTRIBUTE_DEFAULTS:
        if hasattr(source, name):
            setattr(destination, name, getattr(source, name))


def _sharded_parameter(shape, partition_dim, init_method, params_dtype, device, stride=1):
    """A Parameter holding this rank's slice (along ``partition_dim``) of a full
    fp32 master weight of ``shape``, initialized on the CPU by ``init_method``.

    With ``stride`` k the master is k stacked blocks (e.g. SwiGLU's [gate; up]) and
    the rank keeps its slice of each block, in order: ``stride_shard``.
    """
    world_size = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    if (torch.device(device).type if device is not None
            else torch.get_default_device().type) == "meta":
        # Built under torch.device("meta") (weights loaded later, e.g. the
        # inference loader): the CPU master would be drawn and thrown away.
        shard_shape = list(shape)
        shard_shape[partition_dim] //= world_size
        weight = torch.nn.Parameter(torch.empty(shard_shape, dtype=params_dtype, device="meta"))
        set_tensor_model_parallel_attributes(weight, True, partition_dim, stride)
        return weight
    master = torch.empty(shape, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        init_method(master)
    shard = stride_shard(master, partition_dim, world_size, rank, stride)
    # A copy, not a view: a view would keep the whole master weight alive.
    shard = shard.to(device=device, dtype=params_dtype, copy=True).contiguous()
    weight = torch.nn.Parameter(shard, requires_grad=True)
    set_tensor_model_parallel_attributes(weight, True, partition_dim, stride)
    return weight


def stride_shard(full, dim, world_size, rank, stride=1):
    """Rank ``rank``'s shard of ``full`` along ``dim``: with ``stride`` k, ``full`` is k
    equal blocks and the shard is the concatenation of the rank's slice of each block
    ([gate; up] -> [gate_r; up_r]); with k = 1, the plain contiguous chunk."""
    if stride == 1:
        size = full.shape[dim] // world_size  # the callers check divisibility first
        return full.narrow(dim, rank * size, size)  # one view op (cheap under fake tensors)
    pieces = full.chunk(world_size * stride, dim=dim)
    return torch.cat([pieces[j * world_size + rank] for j in range(stride)], dim=dim)


def stride_merge(shards, dim, stride=1):
    """The full tensor from every rank's ``stride_shard`` (the inverse of splitting)."""
    if stride == 1:
        return torch.cat(shards, dim=dim)
    blocks = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([b[j] for j in range(stride) for b in blocks], dim=dim)


def _divide_by_tp(value, world_size, what):
    if value % world_size != 0:
        raise ValueError(f"{what} ({value}) is not divisible by "
                         f"tensor_model_parallel_size ({world_size})")
    return value // world_size


def _bias(size, params_dtype, device):
    return torch.nn.Parameter(torch.zeros(size, dtype=params_dtype, device=device))


class _SequenceParallelGatherLinear(torch.autograd.Function):
    """``F.linear(all_gather_dim0(x), weight, bias)`` that saves only the local
    ``[s / tp, b, h]`` shard ``x`` for backward (as Megatron-LM's
    LinearWithGradAccumulationAndAsyncCommunication with sequence parallelism).

    Forward all-gathers ``x`` along the sequence and multiplies; the gathered
    ``[s, b, h]`` input is freed afterwards. Backward all-gathers the saved
    shard again for the weight gradient, and reduce-scatters the input gradient
    along the sequence (each rank holds a partial sum over its output columns).
    """

    @staticmethod
    def forward(ctx, input_, weight, bias):
        ctx.use_bias = bias is not None
        ctx.save_for_backward(input_, weight)
        return F.linear(_gather_along_first_dim(input_), weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input_, weight = ctx.saved_tensors
        need_input, need_weight, need_bias = ctx.needs_input_grad
        grad_input = grad_weight = grad_bias = None
        if need_input:
            # [s, b, out/tp] @ [out/tp, in] -> partial [s, b, in]; sum over TP
            # ranks and keep this rank's slice of the sequence.
            grad_input = _reduce_scatter_along_first_dim(grad_output.matmul(weight))
        if need_weight:
            total_input = _gather_along_first_dim(input_)  # the re-gather
            grad_weight = grad_output.reshape(-1, grad_output.size(-1)).t().matmul(
                total_input.reshape(-1, total_input.size(-1)))
        if need_bias and ctx.use_bias:
            grad_bias = grad_output.reshape(-1, grad_output.size(-1)).sum(dim=0)
        return grad_input, grad_weight, grad_bias


class ColumnParallelLinear(torch.nn.Module):
    """``Y = X A + b`` with ``A`` split by output columns across TP ranks.

    The weight is ``[output_size / tp, input_size]`` on each rank (dim 0 of the
    ``[out, in]`` weight is split). The input goes through ``f`` (identity
    forward, all-reduce backward) or, with ``sequence_parallel``, is all-gathered
    along dim 0 from ``[s / tp, b, h]`` inside one autograd Function that saves
    only the local shard for backward and re-gathers it there for the weight
    gradient (the input gradient is reduce-scattered along dim 0). With
    ``gather_output`` the output is all-gathered along the last dim; otherwise
    each rank keeps its columns.
    ``forward`` returns ``(output, bias)``: ``bias`` is None unless
    ``skip_bias_add``, in which case it is returned unadded for a later fused op.
    ``stride`` k > 1: the output is k stacked blocks (SwiGLU's [gate; up]) and each
    rank holds its slice of every block, [gate_r; up_r] (``stride_shard``).
    """

    def __init__(self, input_size, output_size, *, bias=True, gather_output=True,
                 init_method, skip_bias_add=False, sequence_parallel=False,
                 params_dtype=torch.float32, device=None, stride=1):
        super().__init__()
        world_size = parallel_state.get_tensor_model_parallel_world_size()
        if stride > 1 and output_size % (world_size * stride) != 0:
            raise ValueError(f"ColumnParallelLinear output_size ({output_size}) is not divisible "
                             f"by tensor_model_parallel_size ({world_size}) x stride ({stride})")
        if sequence_parallel and gather_output:
            raise ValueError("ColumnParallelLinear: sequence_parallel=True needs gather_output=False")
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_per_partition = _divide_by_tp(output_size, world_size,
                                                       "ColumnParallelLinear output_size")
        self.gather_output = gather_output
        self.skip_bias_add = skip_bias_add
        self.sequence_parallel = sequence_parallel
        self.weight = _sharded_parameter((output_size, input_size), 0, init_method,
                                         params_dtype, device, stride)
        if bias:
            self.bias = _bias(self.output_size_per_partition, params_dtype, device)
            set_tensor_model_parallel_attributes(self.bias, True, 0, stride)
        else:
            self.register_parameter("bias", None)

    def forward(self, input_, skip_bias_add=None):
        """``input_`` ``[..., input_size]`` (``[s / tp, b, h]`` with sequence
        parallelism) -> ``(output, bias)``. ``skip_bias_add`` overrides the
        constructor's choice for this call (the model skips only when a fused
        op will add the bias; otherwise the bias is added inside the GEMM)."""
        skip = self.skip_bias_add if skip_bias_add is None else skip_bias_add
        bias = None if skip else self.bias
        if self.sequence_parallel:
            # Gather + matmul in one autograd Function that keeps only the
            # local shard for backward (re-gathered there), not [s, b, h].
            output_parallel = _SequenceParallelGatherLinear.apply(input_, self.weight, bias)
        else:
            input_parallel = copy_to_tensor_model_parallel_region(input_)
            output_parallel = F.linear(input_parallel, self.weight, bias)
        output = gather_from_tensor_model_parallel_region(output_parallel) \
            if self.gather_output else output_parallel
        return output, (self.bias if skip else None)

    def extra_repr(self):
        return (f"input_size={self.input_size}, output_size={self.output_size}, "
                f"per_partition={self.output_size_per_partition}, bias={self.bias is not None}, "
                f"gather_output={self.gather_output}, sequence_parallel={self.sequence_parallel}")


class RowParallelLinear(torch.nn.Module):
    """``Y = X A + b`` with ``A`` split by input rows across TP ranks.

    The weight is ``[output_size, input_size / tp]`` on each rank (dim 1 split).
    The input is this rank's slice of the last dim (``input_is_parallel``) or is
    scattered to it. The partial products are summed by ``g`` (all-reduce), or
    with ``sequence_parallel`` reduce-scattered along dim 0 to ``[s / tp, b, h]``.
    The bias is replicated (``tensor_model_parallel=False``) and added once,
    after the reduction, unless ``skip_bias_add`` returns it instead.
    """

    def __init__(self, input_size, output_size, *, bias=True, input_is_parallel=False,
                 init_method, skip_bias_add=False, sequence_parallel=False,
                 params_dtype=torch.float32, device=None):
        super().__init__()
        world_size = parallel_state.get_tensor_model_parallel_world_size()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel=True needs input_is_parallel=True")
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = _divide_by_tp(input_size, world_size,
                                                      "RowParallelLinear input_size")
        self.input_is_parallel = input_is_parallel
        self.tp_world_size = world_size
        self.skip_bias_add = skip_bias_add
        self.sequence_parallel = sequence_parallel
        self.weight = _sharded_parameter((output_size, input_size), 1, init_method,
                                         params_dtype, device)
        if bias:
            self.bias = _bias(output_size, params_dtype, device)
            set_tensor_model_parallel_attributes(self.bias, False, -1, 1)
            # With sequence parallelism each rank's bias grad covers only its
            # slice of the sequence; the grads are all-reduced over TP later.
            self.bias.sequence_parallel = bool(sequence_parallel)
        else:
            self.register_parameter("bias", None)

    def forward(self, input_, skip_bias_add=None):
        """``input_`` ``[..., input_size / tp]`` (or the full ``[..., input_size]``
        unless ``input_is_parallel``) -> ``(output, bias)``. ``skip_bias_add``
        overrides the constructor's choice for this call."""
        skip = self.skip_bias_add if skip_bias_add is None else skip_bias_add
        input_parallel = input_ if self.input_is_parallel \
            else scatter_to_tensor_model_parallel_region(input_)
        # With one TP rank nothing is summed, so the bias goes inside the GEMM (addmm):
        # one pass over the output fewer. With several it must follow the reduction.
        fold_bias = not skip and self.bias is not None and self.tp_world_size == 1
        output_parallel = F.linear(input_parallel, self.weight, self.bias if fold_bias else None)
        if self.sequence_parallel:
            output = reduce_scatter_to_sequence_parallel_region(output_parallel)
        else:
            output = reduce_from_tensor_model_parallel_region(output_parallel)
        if skip:
            return output, self.bias
        if self.bias is not None and not fold_bias:
            output = output + self.bias
        return output, None

    def extra_repr(self):
        return (f"input_size={self.input_size}, output_size={self.output_size}, "
                f"per_partition={self.input_size_per_partition}, bias={self.bias is not None}, "
                f"input_is_parallel={self.input_is_parallel}, "
                f"sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(torch.nn.Module):
    """Embedding table split by vocabulary rows across TP ranks.

    Each rank looks up the ids in its range ``[start, end)``, writes zeros for
    the others, and the all-reduce over TP assembles the full embedding.
    ``num_embeddings`` must be divisible by TP (the model pads the vocabulary).
    """

    def __init__(self, num_embeddings, embedding_dim, *, init_method,
                 params_dtype=torch.float32, device=None):
        super().__init__()
        world_size = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_per_partition = _divide_by_tp(
            num_embeddings, world_size,
            "VocabParallelEmbedding num_embeddings (pad the vocabulary)")
        self.vocab_start_index, self.vocab_end_index = vocab_range_from_per_partition_vocab_size(
            self.num_embeddings_per_partition, rank)
        self.weight = _sharded_parameter((num_embeddings, embedding_dim), 0, init_method,
                                         params_dtype, device)

    def forward(self, input_):
        """Token ids of any shape -> embeddings ``[*input_.shape, embedding_dim]``."""
        if parallel_state.get_tensor_model_parallel_world_size() > 1:
            outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            local_ids = (input_ - self.vocab_start_index).masked_fill(outside, 0)
            output_parallel = F.embedding(local_ids, self.weight)
            output_parallel = output_parallel.masked_fill(outside.unsqueeze(-1), 0.0)
        else:
            output_parallel = F.embedding(input_, self.weight)
        return reduce_from_tensor_model_parallel_region(output_parallel)

    def extra_repr(self):
        return (f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
                f"per_partition={self.num_embeddings_per_partition}")
