"""Count the collectives this rank issues, by process group and kind, with their bytes.

``CollectiveLog`` is a dispatch mode: every ``torch.distributed`` collective and
point-to-point op reaches the dispatcher as a ``c10d`` op carrying its process group,
whatever Python function issued it (an autograd mapping, the grad buffer, p2p, the
optimizer's scalars). Entering the mode records each one as ``(group, kind)`` with a
call count and bytes; it works the same on real (gloo, nccl) and fake process groups.

Groups are named from ``parallel_state``: ``tp``, ``pp``, ``dp``, ``mp`` (model
parallel: TP x PP of one replica), ``embedding`` (first and last stage), ``world`` (the
default group), else ``other``. Bytes are those of the largest tensor argument: the
tensor of an all-reduce, broadcast, send or receive, the gathered output of an
all-gather, the full input of a reduce-scatter.
"""
import collections

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from . import parallel_state as ps

# c10d op name prefixes -> kind. Longer prefixes first: "reduce_scatter" before "reduce".
_KIND_PREFIXES = (
    ("allreduce", "all_reduce"), ("allgather", "all_gather"), ("_allgather", "all_gather"),
    ("reduce_scatter", "reduce_scatter"), ("_reduce_scatter", "reduce_scatter"),
    ("broadcast", "broadcast"), ("alltoall", "all_to_all"), ("reduce", "reduce"),
    ("gather", "gather"), ("scatter", "scatter"), ("barrier", "barrier"),
    ("monitored_barrier", "barrier"), ("send", "send"), ("recv", "recv"),
)


def collective_kind(op_name):
    """The kind of a ``c10d`` op (``"allreduce_"`` -> ``"all_reduce"``); None if unknown."""
    for prefix, kind in _KIND_PREFIXES:
        if op_name.startswith(prefix):
            return kind
    return None


def _process_group(args):
    for a in args:
        if isinstance(a, torch.ScriptObject) and "ProcessGroup" in str(a._type()):
            return dist.ProcessGroup.unbox(a)
    return None


def group_name(group):
    """``tp``, ``pp``, ``dp``, ``mp``, ``embedding``, ``world`` or ``other`` for ``group``."""
    named = (("tp", ps.get_tensor_model_parallel_group()),
             ("pp", ps.get_pipeline_model_parallel_group()),
             ("dp", ps.get_data_parallel_group()),
             ("mp", ps.get_model_parallel_group()),
             ("embedding", ps.get_embedding_group()))
    for name, g in named:
        if g is not None and group is g:
            return name
    if dist.is_initialized() and group is dist.group.WORLD:
        return "world"
    return "other"


class CollectiveLog(TorchDispatchMode):
    """Dispatch mode recording this rank's collectives: ``counts[(group, kind)]`` is
    ``{"calls": n, "bytes": b}``. Ops pass through unchanged."""

    def __init__(self):
        super().__init__()
        self.counts = collections.defaultdict(lambda: {"calls": 0, "bytes": 0})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.observe(func, args)
        return func(*args, **(kwargs or {}))

    def observe(self, func, args, kwargs=None, out=None):
        """Record ``func`` if it is a collective (for another dispatch mode to call)."""
        if func.namespace == "c10d":
            kind = collective_kind(func._opname)
            if kind is not None:
                self.record(kind, _process_group(args), args)

    def record(self, kind, group, args):
        """Count one ``kind`` call on ``group`` moving the largest tensor among ``args``."""
        sizes = [sum(t.numel() * t.element_size() for t in tree_leaves(a)
                     if isinstance(t, torch.Tensor)) for a in args]
        entry = self.counts[(group_name(group), kind)]
        entry["calls"] += 1
        entry["bytes"] += max(sizes, default=0)

    def summary(self):
        """A plain dict ``{(group, kind): {"calls", "bytes"}}``, sorted by group and kind."""
        return {k: dict(v) for k, v in sorted(self.counts.items())}
