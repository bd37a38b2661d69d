"""Count the collectives of one transformer layer at TP=2, forward and backward.

The paper's promise: 2 all-reduces forward and 2 backward per layer, nothing
else; with sequence parallelism each all-reduce becomes an all-gather plus a
reduce-scatter and no all-reduce remains: forward 2 all-gathers (the column
layers' inputs: QKV, h->4h) + 2 reduce-scatters (the row layers' outputs);
backward 4 all-gathers + 2 reduce-scatters. Backward, each column layer saves
only its [s/tp, b, h] shard, so it all-gathers it again for the weight gradient
(1 all-gather) and reduce-scatters the input gradient (1 reduce-scatter); each
row layer all-gathers its output gradient (1 all-gather). As in Megatron-LM.
"""
import collections
import contextlib

import torch
import torch.distributed as dist

from megatron import mpu
from megatron.model.transformer import ParallelTransformerLayer
from tests.dist_harness import run_distributed
from tests.helpers.collectives import layer_collectives
from tests.helpers.model import tiny_cfg

# Every collective (and point-to-point op) torch.distributed offers that a layer
# could use, by kind; all are counted so that an unexpected one shows up. Names
# of one kind are aliases across torch versions (all_gather_single is the new
# all_gather_into_tensor).
_KINDS = {
    "all_reduce": "all_reduce",
    "all_gather_into_tensor": "all_gather", "all_gather_single": "all_gather",
    "_all_gather_base": "all_gather", "all_gather": "all_gather",
    "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_single": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter", "reduce_scatter": "reduce_scatter",
    "broadcast": "broadcast", "reduce": "reduce", "all_to_all": "all_to_all",
    "all_to_all_single": "all_to_all", "gather": "gather", "scatter": "scatter",
    "send": "p2p", "recv": "p2p", "isend": "p2p", "irecv": "p2p", "batch_isend_irecv": "p2p",
    "all_gather_object": "object", "broadcast_object_list": "object", "barrier": "barrier",
}


@contextlib.contextmanager
def count_collectives():
    """Wrap the torch.distributed functions; yield a Counter of calls by kind.

    Only the outermost call counts, so an alias that forwards to another
    watched function is counted once.
    """
    counts = collections.Counter()
    depth = [0]
    originals = {}
    for name, kind in _KINDS.items():
        fn = getattr(dist, name, None)
        if fn is None:
            continue
        originals[name] = fn

        def wrapped(*args, _fn=fn, _kind=kind, **kwargs):
            if depth[0] == 0:
                counts[_kind] += 1
            depth[0] += 1
            try:
                return _fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        setattr(dist, name, wrapped)
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _layer_counts(sequence_parallel, recompute):
    cfg = tiny_cfg(parallel__tensor_model_parallel_size=2,
                   parallel__sequence_parallel=sequence_parallel,
                   model__hidden_dropout=0.1, model__attention_dropout=0.1,
                   training__recompute="selective" if recompute == "selective" else "none")
    layer = ParallelTransformerLayer(cfg, sequence_parallel=sequence_parallel)
    s = cfg.model.seq_length // (2 if sequence_parallel else 1)
    x = torch.randn(s, 2, cfg.model.hidden_size, requires_grad=True)
    with count_collectives() as forward:
        out = mpu.checkpoint(layer, x) if recompute == "full" else layer(x)
    with count_collectives() as backward:
        out.backward(torch.randn_like(out))
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())
    return dict(forward), dict(backward)


def _all_counts():
    mpu.initialize_model_parallel(2)
    mpu.model_parallel_seed(1)
    return {(sp, rc): _layer_counts(sp, rc)
            for sp in (False, True) for rc in ("none", "selective", "full")}


def test_collectives_per_layer_at_tp2():
    # The expected counts (tests/helpers/collectives.py) are also what the dry run's
    # per-step totals are built from (tests/test_dry_run.py).
    for counts in run_distributed(_all_counts, 2):
        for sp in (False, True):
            for rc in ("none", "selective", "full"):
                assert counts[(sp, rc)] == layer_collectives(sp, rc), (sp, rc, counts)
        # The paper's numbers, spelled out once: 2 all-reduces forward and 2 backward.
        assert counts[(False, "none")] == ({"all_reduce": 2}, {"all_reduce": 2})
