"""Data-parallel gradient buffer and the gradient reductions of a training step.

``DistributedDataParallel`` keeps every trainable parameter's gradient in one
contiguous buffer per (param dtype, grad dtype) pair: ``param.main_grad`` is a
view into it, and a post-accumulate-grad hook adds ``param.grad`` into
``main_grad`` and frees ``param.grad``. With ``accumulate_allreduce_grads_in_fp32``
the buffer is fp32, so fp16/bf16 gradients accumulate over micro batches in fp32.
``finish_grad_sync`` averages the buffer over the data-parallel group once per
global batch: an all-reduce, or a reduce-scatter when the distributed (ZeRO-1)
optimizer owns one contiguous shard of the buffer per DP rank. In that case the
parameters are views into a matching contiguous parameter buffer as well, so the
optimizer can all-gather the updated shards straight into the model.

The small scalar reductions the optimizer needs (found-inf max, squared-norm
sum) live here too, because only ``mpu`` calls collectives.
"""
import torch
import torch.distributed as dist

from megatron.mpu import parallel_state
from megatron.mpu.mappings import _all_gather_dim0 as _all_gather
from megatron.mpu.mappings import _reduce_scatter_dim0 as _reduce_scatter


def _group_size(group):
    """World size of ``group``; 1 when there is no process group at all."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group=group)


class GradBuffer:
    """One contiguous gradient buffer (and, when sharded, parameter buffer).

    ``params`` share a parameter dtype; ``grad_dtype`` is the buffer's dtype.
    ``index[param] = (start, end)`` is the param's flat range in the buffer. The
    buffer is padded to a multiple of ``data_parallel_size`` so each DP rank owns
    the equal contiguous shard ``shard_range(r)``.
    """

    def __init__(self, params, grad_dtype, data_parallel_size, with_param_buffer):
        self.params = list(params)
        self.param_dtype = self.params[0].dtype
        self.grad_dtype = grad_dtype
        self.data_parallel_size = data_parallel_size
        device = self.params[0].device
        self.index = {}
        offset = 0
        for p in self.params:
            self.index[p] = (offset, offset + p.numel())
            offset += p.numel()
        self.numel_unpadded = offset
        self.numel = -(-offset // data_parallel_size) * data_parallel_size
        self.data = torch.zeros(self.numel, dtype=grad_dtype, device=device)
        for p, view in zip(self.params, self._views(self.data)):
            p.main_grad = view
        self.param_data = None
        if with_param_buffer:
            # Parameters become views into one flat tensor so the updated
            # shards can be all-gathered in a single collective.
            self.param_data = torch.zeros(self.numel, dtype=self.param_dtype, device=device)
            with torch.no_grad():
                for p, view in zip(self.params, self._views(self.param_data)):
                    view.copy_(p)
                    p.data = view

    def _views(self, flat):
        """Each param's view into ``flat`` (laid out as ``index``), from one split."""
        sizes = [p.numel() for p in self.params] + [self.numel - self.numel_unpadded]
        return [part.view(p.shape) for p, part in zip(self.params, flat.split(sizes))]

    def shard_range(self, dp_rank):
        """Flat ``(start, end)`` of the shard that DP rank ``dp_rank`` owns."""
        size = self.numel // self.data_parallel_size
        return dp_rank * size, (dp_rank + 1) * size

    def zero(self):
        """Zero the gradients (the buffer keeps its storage)."""
        self.data.zero_()


class DistributedDataParallel(torch.nn.Module):
    """Wrap a model chunk: contiguous fp32 (or param-dtype) grad buffer, DP averaging.

    ``forward`` passes through; ``state_dict`` / ``load_state_dict`` use the
    wrapped module's own keys, so checkpoints load into the bare model. Wrap
    after casting and moving the module: the buffers take the params' device
    and dtype. Unknown attributes (e.g. ``set_input_tensor``) fall through to
    the wrapped module.
    """

    def __init__(self, module, accumulate_allreduce_grads_in_fp32=True,
                 use_distributed_optimizer=False):
        super().__init__()
        self.module = module
        self.accumulate_allreduce_grads_in_fp32 = accumulate_allreduce_grads_in_fp32
        self.use_distributed_optimizer = use_distributed_optimizer
        self.data_parallel_group = parallel_state.get_data_parallel_group()
        self.data_parallel_size = parallel_state.get_data_parallel_world_size()

        by_dtype = {}
        for p in module.parameters():
            if not p.requires_grad:
                continue
            grad_dtype = torch.float32 if accumulate_allreduce_grads_in_fp32 else p.dtype
            by_dtype.setdefault((p.dtype, grad_dtype), []).append(p)
        self.buffers_ = [GradBuffer(ps, gd, self.data_parallel_size, use_distributed_optimizer)
                         for (_, gd), ps in by_dtype.items()]
        self.param_to_buffer = {p: b for b in self.buffers_ for p in b.params}
        self._hooks = [p.register_post_accumulate_grad_hook(self._accumulate)
                       for p in self.param_to_buffer]
        # The params finalize_model_grads reduces over TP / the embedding
        # group, found once instead of by a scan of every param each step.
        self.sequence_parallel_params, self.tied_embedding_params = _special_params(module)

    @staticmethod
    def _accumulate(param):
        # Runs once per backward after autograd has summed every use of the
        # param; moving the grad out keeps param.grad from holding memory.
        param.main_grad.add_(param.grad)
        param.grad = None

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)

    def forward(self, *args, **kwargs):
        """The wrapped module's forward."""
        return self.module(*args, **kwargs)

    def zero_grad_buffer(self):
        """Zero every ``main_grad`` (call once per global batch, before the first micro batch)."""
        for b in self.buffers_:
            b.zero()
        for p in self.param_to_buffer:
            p.grad = None

    def finish_grad_sync(self):
        """Average the grad buffers over the data-parallel group.

        All-reduce, or with the distributed optimizer a reduce-scatter: only
        this rank's shard (``GradBuffer.shard_range``) is then the DP average.
        """
        world = self.data_parallel_size
        if world == 1 or _group_size(self.data_parallel_group) == 1:
            return
        for b in self.buffers_:
            b.data.div_(world)
            if self.use_distributed_optimizer:
                start, end = b.shard_range(dist.get_rank(self.data_parallel_group))
                # A separate output: not every backend allows it to alias the input.
                shard = torch.empty(end - start, dtype=b.data.dtype, device=b.data.device)
                _reduce_scatter(shard, b.data, self.data_parallel_group)
                b.data[start:end].copy_(shard)
            else:
                dist.all_reduce(b.data, group=self.data_parallel_group)

    def gather_params(self):
        """All-gather every rank's parameter shard into the parameter buffers
        (distributed optimizer only; the params are views into them)."""
        group = self.data_parallel_group
        if _group_size(group) == 1:
            return
        for b in self.buffers_:
            start, end = b.shard_range(dist.get_rank(group))
            _all_gather(b.param_data, b.param_data[start:end].clone(), group)

    def state_dict(self, *args, **kwargs):
        """The wrapped module's state dict (no ``module.`` prefix)."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, **kwargs):
        """Load into the wrapped module (in place, so param-buffer views survive)."""
        return self.module.load_state_dict(state_dict, strict=strict, **kwargs)


def _special_params(module):
    """``(sequence_parallel params, tied_embedding params)`` of ``module`` that need grads."""
    sp_params, tied_params = [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if getattr(p, "sequence_parallel", False):
            sp_params.append(p)
        if getattr(p, "tied_embedding", False):
            tied_params.append(p)
    return sp_params, tied_params


def _all_reduce_grads(params, group):
    """Sum the ``main_grad`` (or ``grad``) of ``params`` over ``group``, coalesced."""
    grads = [p.main_grad if getattr(p, "main_grad", None) is not None else p.grad
             for p in params]
    grads = [g for g in grads if g is not None]
    if not grads or _group_size(group) == 1:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def finalize_model_grads(model_chunks):
    """Finish the gradients of one global batch, before ``optimizer.step()``.

    Sums the grads of ``sequence_parallel`` params over TP and of
    ``tied_embedding`` params over the embedding group (PP > 1), then averages
    every chunk over DP. The model-parallel sums come first so that, with the
    distributed optimizer's reduce-scatter, every element of a rank's shard
    already holds its full model-parallel sum; the result equals DP-first order
    because the operations are linear. With virtual pipelining the embedding
    sum ignores the current virtual rank: the chunks holding the embedding
    are found by their ``tied_embedding`` params.
    """
    sp_params, tied_params = [], []
    for chunk in model_chunks:
        if isinstance(chunk, DistributedDataParallel):
            sp, tied = chunk.sequence_parallel_params, chunk.tied_embedding_params
        else:  # a bare module: scan it
            sp, tied = _special_params(chunk)
        sp_params.extend(sp)
        tied_params.extend(tied)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        _all_reduce_grads(sp_params, parallel_state.get_tensor_model_parallel_group())
    if (parallel_state.get_pipeline_model_parallel_world_size() > 1
            and parallel_state.is_rank_in_embedding_group(ignore_virtual=True)):
        _all_reduce_grads(tied_params, parallel_state.get_embedding_group())
    for chunk in model_chunks:
        if hasattr(chunk, "finish_grad_sync"):
            chunk.finish_grad_sync()


def all_reduce_max_model_and_data_parallel(tensor):
    """In-place max of a small tensor over the model-parallel and DP groups
    (an overflow anywhere is seen everywhere). Returns ``tensor``."""
    for group in (parallel_state.get_model_parallel_group(),
                  parallel_state.get_data_parallel_group()):
        if _group_size(group) > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def all_reduce_sum_model_parallel(tensor, include_data_parallel=False):
    """In-place sum of a small tensor over the model-parallel group, and also
    over DP when each DP rank holds a disjoint shard. Returns ``tensor``."""
    groups = [parallel_state.get_model_parallel_group()]
    if include_data_parallel:
        groups.append(parallel_state.get_data_parallel_group())
    for group in groups:
        if _group_size(group) > 1:
            dist.all_reduce(tensor, group=group)
    return tensor
