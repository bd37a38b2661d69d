"""The paper's conjugate communication operators, as autograd functions.

``f`` (copy_to_tensor_model_parallel_region) is the identity forward and an
all-reduce backward; ``g`` (reduce_from_tensor_model_parallel_region) is the
reverse. Scatter / gather move between a full last dimension and this rank's
slice of it. The sequence-parallel operators do the same along dim 0 (the
sequence dim of ``[s, b, h]``), where an all-reduce becomes a reduce-scatter
followed later by an all-gather.

Every operator is the identity when the TP group has one rank, so a model built
without any process group runs unchanged.
"""
import torch
import torch.distributed as dist

from . import parallel_state


def _all_gather_dim0(out, x, group):
    # torch >= 2.13 renamed all_gather_into_tensor (kept as a deprecated alias);
    # looked up per call so that tests can count collectives by patching dist.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)


def _reduce_scatter_dim0(out, x, group):
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x, group=group)


def _tp_group_and_size():
    return (parallel_state.get_tensor_model_parallel_group(),
            parallel_state.get_tensor_model_parallel_world_size())


def _all_reduce(x):
    group, world_size = _tp_group_and_size()
    if world_size == 1:
        return x
    # A fresh tensor: the caller's input (or an incoming gradient that autograd
    # may still hold elsewhere) must not be overwritten in place.
    out = x.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


def _split_along_last_dim(x):
    group, world_size = _tp_group_and_size()
    if world_size == 1:
        return x
    if x.size(-1) % world_size != 0:
        raise ValueError(f"last dimension ({x.size(-1)}) is not divisible by the tensor "
                         f"model parallel size ({world_size})")
    rank = parallel_state.get_tensor_model_parallel_rank()
    return x.chunk(world_size, dim=-1)[rank].contiguous()


def _gather_along_last_dim(x):
    group, world_size = _tp_group_and_size()
    if world_size == 1:
        return x
    # Gather along dim 0 (what all_gather_into_tensor does), then move each
    # rank's block to its place along the last dim, rank-major.
    gathered = _gather_along_first_dim(x).view(world_size, *x.shape)
    return gathered.movedim(0, -2).reshape(*x.shape[:-1], world_size * x.shape[-1])


def _split_along_first_dim(x):
    group, world_size = _tp_group_and_size()
    if world_size == 1:
        return x
    if x.size(0) % world_size != 0:
        raise ValueError(f"sequence dimension ({x.size(0)}) is not divisible by the tensor "
                         f"model parallel size ({world_size})")
    rank = parallel_state.get_tensor_model_parallel_rank()
    # A copy, not ``.contiguous()``: a slice of dim 0 is contiguous already, and the view
    # would keep the whole [s, b, h] tensor alive for as long as the shard is saved for
    # backward (the embedding output of each in-flight micro batch without dropout).
    return x.chunk(world_size, dim=0)[rank].clone()


def _gather_along_first_dim(x):
    group, world_size = _tp_group_and_size()
    if world_size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((world_size * x.size(0),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_dim0(out, x, group)
    return out


def _reduce_scatter_along_first_dim(x):
    group, world_size = _tp_group_and_size()
    if world_size == 1:
        return x
    if x.size(0) % world_size != 0:
        raise ValueError(f"sequence dimension ({x.size(0)}) is not divisible by the tensor "
                         f"model parallel size ({world_size})")
    x = x.contiguous()
    out = torch.empty((x.size(0) // world_size,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_dim0(out, x, group)
    return out


class _CopyToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad)


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _all_reduce(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ScatterToModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_along_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along_last_dim(grad)


class _GatherFromModelParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _gather_along_last_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _split_along_last_dim(grad)


class _ScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _split_along_first_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along_first_dim(grad)


class _GatherFromSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tensor_parallel_output_grad):
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _gather_along_first_dim(x)

    @staticmethod
    def backward(ctx, grad):
        # The consumer of the gathered tensor is TP-split (a column-parallel
        # linear): each rank holds a partial gradient of the whole sequence, so
        # sum them and keep this rank's part. A replicated consumer already
        # holds the full gradient: just keep this rank's part.
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter_along_first_dim(grad), None
        return _split_along_first_dim(grad), None


class _ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _reduce_scatter_along_first_dim(x)

    @staticmethod
    def backward(ctx, grad):
        return _gather_along_first_dim(grad)


def copy_to_tensor_model_parallel_region(x):
    """``f``: identity forward, all-reduce of the gradient over TP backward."""
    return _CopyToModelParallelRegion.apply(x)


def reduce_from_tensor_model_parallel_region(x):
    """``g``: all-reduce over TP forward, identity backward."""
    return _ReduceFromModelParallelRegion.apply(x)


def scatter_to_tensor_model_parallel_region(x):
    """Keep this rank's slice of the last dim forward; all-gather it backward."""
    return _ScatterToModelParallelRegion.apply(x)


def gather_from_tensor_model_parallel_region(x):
    """All-gather the last dim over TP forward; keep this rank's slice backward."""
    return _GatherFromModelParallelRegion.apply(x)


def scatter_to_sequence_parallel_region(x):
    """Keep this rank's slice of dim 0 (sequence) forward; all-gather it backward."""
    return _ScatterToSequenceParallelRegion.apply(x)


def gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True):
    """All-gather dim 0 (sequence) over TP forward.

    Backward: reduce-scatter when the gathered tensor feeds a TP-split
    computation (``tensor_parallel_output_grad=True``), otherwise just keep this
    rank's slice of the gradient.
    """
    return _GatherFromSequenceParallelRegion.apply(x, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel_region(x):
    """Reduce-scatter dim 0 (sequence) over TP forward; all-gather backward."""
    return _ReduceScatterToSequenceParallelRegion.apply(x)
