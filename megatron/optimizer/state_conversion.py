"""Convert optimizer state between the plain and the distributed (ZeRO-1) optimizer.

Both go through the distributed optimizer's *full state*: whole fp32 params and
Adam moments as one flat tensor per DDP grad buffer (buffer coordinates, which
depend on the model only, not on DP or on the optimizer kind), plus one step
count, the param groups' hyperparameters and the loss-scaler state
(``full_state_from_shards``). A plain optimizer's per-param state is scattered
into that layout or read back out of it through ``GradBuffer.index``.
"""
import torch

from megatron.optimizer.distributed_optimizer import (clone_if_tensor, full_state_from_shards,
                                                      merge_param_groups)
from megatron.optimizer.optimizer import HALF_DTYPES


def _buffer_index(buffers):
    """model param -> (buffer number, start, end) in buffer coordinates."""
    return {p: (b, *buf.index[p]) for b, buf in enumerate(buffers) for p in buf.params}


@torch.no_grad()
def plain_to_distributed(optimizer, plain):
    """Load a plain optimizer's ``state_dict()`` into the DistributedOptimizer
    ``optimizer``: the fp32 value of each param (its master when it is
    fp16/bf16, else the already loaded model param) and its Adam moments go
    into full buffers, of which this DP rank takes its slices."""
    params = optimizer.model_params
    inner = plain["optimizer"]
    ids = [i for g in inner["param_groups"] for i in g["params"]]
    if len(ids) != len(params):
        raise ValueError(f"plain optimizer checkpoint holds {len(ids)} params but this model "
                         f"has {len(params)}")
    masters = list(plain.get("fp32_from_fp16_params") or [])
    n_half = sum(p.dtype in HALF_DTYPES for p in params)
    if len(masters) != n_half:
        raise ValueError(f"plain optimizer checkpoint holds {len(masters)} fp32 master params "
                         f"but this model has {n_half} half-precision params")
    masters = iter(masters)
    where = _buffer_index(optimizer._buffers)
    full = {k: [torch.zeros(n, dtype=torch.float32) for n in optimizer.buffer_numels()]
            for k in ("param", "exp_avg", "exp_avg_sq")}
    step = None
    for i, p in zip(ids, params):
        b, lo, hi = where[p]
        value = next(masters) if p.dtype in HALF_DTYPES else p.detach()
        if value.numel() != p.numel():
            raise ValueError(f"plain optimizer checkpoint's fp32 master of shape "
                             f"{tuple(value.shape)} does not match param {tuple(p.shape)}")
        full["param"][b][lo:hi] = value.reshape(-1).cpu()
        state = inner["state"].get(i)
        if state:  # params that never had a grad have no Adam state: zeros, as when resharding
            full["exp_avg"][b][lo:hi] = state["exp_avg"].reshape(-1).cpu()
            full["exp_avg_sq"][b][lo:hi] = state["exp_avg_sq"].reshape(-1).cpu()
            step = state["step"]
    optimizer.load_full_state({**full, "step": step, "param_groups": inner["param_groups"],
                               "grad_scaler": plain.get("grad_scaler")})


@torch.no_grad()
def distributed_to_plain(optimizer, shards):
    """Load the state dicts of every DP rank of a distributed optimizer into the
    plain (FP32 / MixedPrecision) ``optimizer``, whose model chunks must be
    DistributedDataParallel wrappers (their grad buffers give the layout)."""
    chunks = [c for c in optimizer.model_chunks if not hasattr(c, "buffers_")]
    if chunks:
        raise ValueError(f"converting distributed optimizer state needs DDP-wrapped model "
                         f"chunks, got {type(chunks[0]).__name__}")
    buffers = [b for c in optimizer.model_chunks for b in c.buffers_]
    full = full_state_from_shards(shards, [b.numel_unpadded for b in buffers])
    where = _buffer_index(buffers)
    model_of = getattr(optimizer, "_model_of", {})  # master -> model param (mixed precision)
    groups = merge_param_groups(optimizer.optimizer, full["param_groups"])
    ids = [i for g in groups for i in g["params"]]
    mains = [p for g in optimizer.optimizer.param_groups for p in g["params"]]
    state, fp32_value = {}, {}
    for i, main in zip(ids, mains):
        p = model_of.get(main, main)
        b, lo, hi = where[p]
        # Views of the full buffers (load_state_dict keeps same-dtype tensors as they are).
        fp32_value[p] = full["param"][b][lo:hi].view_as(main)
        if full["step"] is not None:
            state[i] = {"step": clone_if_tensor(full["step"]),
                        "exp_avg": full["exp_avg"][b][lo:hi].view_as(main),
                        "exp_avg_sq": full["exp_avg_sq"][b][lo:hi].view_as(main)}
    # fp32 model params need no copy: the model file holds them, gathered after
    # the last step, equal to the distributed optimizer's masters.
    optimizer.load_state_dict({
        "optimizer": {"state": state, "param_groups": groups},
        "grad_scaler": full["grad_scaler"],
        "fp32_from_fp16_params": [fp32_value[p] for p, _ in getattr(optimizer, "_pairs", [])]})
