"""Distributed (ZeRO-1) optimizer: fp32 master params and Adam state sharded over DP.

Each DDP grad buffer (``mpu.distributed.GradBuffer``) is cut into DP equal
contiguous shards; this rank owns shard ``dp_rank``. For every param that
overlaps the shard, the overlapping slice gets an fp32 master (a view of the
fp32 param buffer itself for fp32 params, a copy for fp16/bf16 ones) and its
grad is the matching slice of the reduce-scattered grad buffer. After the step
the updated slices are written into the param buffer and all-gathered over DP,
so every rank's model params are whole again. Master params and Adam moments
therefore take 1/DP of the plain optimizer's bytes per rank.
"""
import torch

from megatron.mpu import parallel_state
from megatron.optimizer.clip_grads import counts_toward_norm
from megatron.optimizer.optimizer import MegatronOptimizer


class _ShardEntry:
    """This rank's slice ``[lo, hi)`` (buffer coordinates) of one model param."""

    __slots__ = ("param", "buffer", "lo", "hi", "master")

    def __init__(self, param, buffer, lo, hi, master):
        self.param, self.buffer, self.lo, self.hi, self.master = param, buffer, lo, hi, master


class DistributedOptimizer(MegatronOptimizer):
    """ZeRO-1 over the contiguous DDP buffers of ``model_chunks``.

    ``param_groups`` are torch-style groups of model params (weight-decay
    settings); ``build_inner`` makes the inner AdamW from the matching groups of
    shard masters. The chunks must be ``DistributedDataParallel`` wrappers built
    with ``use_distributed_optimizer=True``.
    """

    is_sharded = True
    _norm_over_data_parallel = True

    def __init__(self, param_groups, build_inner, model_chunks, clip_grad=0.0,
                 grad_scaler=None, log_num_zeros_in_grad=False):
        super().__init__(model_chunks, clip_grad, grad_scaler, log_num_zeros_in_grad)
        for chunk in self.model_chunks:
            if not getattr(chunk, "use_distributed_optimizer", False):
                raise ValueError("parallel.distributed_optimizer needs every model chunk wrapped "
                                 "in DistributedDataParallel(..., use_distributed_optimizer=True)")
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()

        self._entries = {}  # model param -> _ShardEntry
        self._buffers = []
        for chunk in self.model_chunks:
            for buf in chunk.buffers_:
                self._buffers.append(buf)
                start, end = buf.shard_range(self.dp_rank)
                for p in buf.params:
                    ps, pe = buf.index[p]
                    lo, hi = max(ps, start), min(pe, end)
                    if lo >= hi:
                        continue
                    shard = buf.param_data[lo:hi]
                    master = shard if shard.dtype == torch.float32 else shard.detach().float()
                    self._entries[p] = _ShardEntry(p, buf, lo, hi, master)

        # All model params in group order: the plain optimizer's inner indices
        # (state_conversion maps a plain checkpoint through them).
        self.model_params = [p for g in param_groups for p in g["params"]]
        master_groups = []
        for group in param_groups:
            masters = [self._entries[p].master for p in group["params"] if p in self._entries]
            master_groups.append({**group, "params": masters})
        self._order = [e for g in param_groups for p in g["params"]
                       if (e := self._entries.get(p)) is not None]
        self.optimizer = build_inner(master_groups)
        self._main = [(e.master, counts_toward_norm(e.param)) for e in self._order]

    def _copy_model_grads_to_main_grads(self):
        for e in self._order:
            g = e.buffer.data[e.lo:e.hi]
            e.master.grad = g if g.dtype == torch.float32 else g.float()

    def _copy_main_params_to_model_params(self):
        for e in self._order:
            shard = e.buffer.param_data[e.lo:e.hi]
            if shard.dtype != torch.float32:  # else the master is this very shard
                shard.copy_(e.master)
        for chunk in self.model_chunks:
            chunk.gather_params()

    @torch.no_grad()
    def reload_model_params(self):
        """Refresh the fp32 shard masters from the (just loaded) model params."""
        for e in self._order:
            shard = e.buffer.param_data[e.lo:e.hi]
            if shard.dtype != torch.float32:  # else the master is this very shard
                e.master.copy_(shard)

    def _layout(self):
        """Buffer sizes and this rank's slices, to check a checkpoint fits."""
        return {"buffer_numels": self.buffer_numels(),
                "slices": [(self._buffers.index(e.buffer), e.lo, e.hi) for e in self._order]}

    def state_dict(self):
        """This rank's shard: inner optimizer state, scaler, fp32 masters, DP size and ranges."""
        return {"optimizer": self.optimizer.state_dict(),
                "grad_scaler": self._scaler_state(),
                "shard_fp32_params": [e.master.detach().clone() for e in self._order],
                "data_parallel_size": self.dp_size,
                "data_parallel_rank": self.dp_rank,
                **self._layout()}

    def load_state_dict(self, state_dict):
        """Resume from this rank's shard (a dict saved at the same DP size and
        rank: exact), or re-shard from the list of *every* DP rank's shard of a
        run at any DP size. A single shard from another DP size is refused with
        both sizes named."""
        if isinstance(state_dict, (list, tuple)):
            return self._load_resharded(list(state_dict))
        saved_dp = state_dict.get("data_parallel_size")
        if saved_dp != self.dp_size:
            raise ValueError(
                f"distributed optimizer checkpoint was saved at data-parallel size {saved_dp} "
                f"but this run has data-parallel size {self.dp_size}; resume at DP={saved_dp} "
                f"or load the shards of all {saved_dp} DP ranks to re-shard")
        if state_dict.get("data_parallel_rank", self.dp_rank) != self.dp_rank:
            raise ValueError(f"distributed optimizer shard of DP rank "
                             f"{state_dict['data_parallel_rank']} loaded on DP rank {self.dp_rank}")
        layout = self._layout()
        if (list(state_dict.get("buffer_numels", [])) != layout["buffer_numels"]
                or [tuple(s) for s in state_dict.get("slices", [])] != layout["slices"]):
            raise ValueError(
                f"distributed optimizer checkpoint's gradient buffers "
                f"{list(state_dict.get('buffer_numels', []))} do not match this model's "
                f"{layout['buffer_numels']}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._load_scaler_state(state_dict.get("grad_scaler"))
        with torch.no_grad():
            for e, saved in zip(self._order, state_dict["shard_fp32_params"]):
                e.master.copy_(saved)
            self._copy_main_params_to_model_params()

    @torch.no_grad()
    def _load_resharded(self, shards):
        """Rebuild whole fp32 params and Adam moments (in buffer coordinates,
        which do not depend on DP) from every saved shard, then take this
        rank's slices of them."""
        self.load_full_state(full_state_from_shards(shards, self.buffer_numels()))

    def buffer_numels(self):
        """Unpadded sizes of the grad buffers (buffer coordinates of the full state)."""
        return [b.numel_unpadded for b in self._buffers]

    @torch.no_grad()
    def load_full_state(self, full):
        """Load this rank's slices of a ``full_state_from_shards``-style dict: whole
        fp32 params / Adam moments per buffer, one step count, param groups, scaler."""
        new_state = {}
        for k, e in enumerate(self._order):
            b = self._buffers.index(e.buffer)
            if full["step"] is not None:  # every slice is stepped together: one count fits all
                new_state[k] = {"step": clone_if_tensor(full["step"]),
                                "exp_avg": full["exp_avg"][b][e.lo:e.hi].clone(),
                                "exp_avg_sq": full["exp_avg_sq"][b][e.lo:e.hi].clone()}
        self.optimizer.load_state_dict(
            {"state": new_state, "param_groups": merge_param_groups(self.optimizer,
                                                                    full["param_groups"])})
        self._load_scaler_state(full["grad_scaler"])
        for e in self._order:
            b = self._buffers.index(e.buffer)
            e.master.copy_(full["param"][b][e.lo:e.hi])
        self._copy_main_params_to_model_params()


def clone_if_tensor(x):
    """A copy of ``x`` if it is a tensor (an Adam step count may be either), else ``x``."""
    return x.clone() if torch.is_tensor(x) else x


def merge_param_groups(inner, saved_groups):
    """``inner``'s param groups (its param ids) with the saved hyperparameters (lr, ...)."""
    mine = inner.state_dict()["param_groups"]
    if len(mine) != len(saved_groups):
        raise ValueError(f"optimizer checkpoint has {len(saved_groups)} param groups but this "
                         f"optimizer has {len(mine)}")
    return [{**saved, "params": m["params"]} for m, saved in zip(mine, saved_groups)]


@torch.no_grad()
def full_state_from_shards(shards, numels):
    """Whole fp32 params and Adam moments, one flat tensor per grad buffer of
    ``numels`` elements, rebuilt from the state dicts of *every* DP rank of a
    distributed optimizer; with the step count (None if never stepped), the
    saved param groups and the scaler state."""
    shards = sorted(shards, key=lambda sd: sd.get("data_parallel_rank", -1))
    old_dp = shards[0].get("data_parallel_size") if shards else None
    ranks = [sd.get("data_parallel_rank") for sd in shards]
    if old_dp is None or ranks != list(range(old_dp)):
        raise ValueError(f"re-sharding the distributed optimizer needs the shards of all "
                         f"{old_dp} data-parallel ranks, got ranks {ranks}")
    numels = list(numels)
    for sd in shards:
        if list(sd.get("buffer_numels", [])) != numels:
            raise ValueError(f"distributed optimizer checkpoint's gradient buffers "
                             f"{list(sd.get('buffer_numels', []))} do not match this "
                             f"model's {numels}")
    full = {k: [torch.zeros(n, dtype=torch.float32) for n in numels]
            for k in ("param", "exp_avg", "exp_avg_sq")}
    step = None
    for sd in shards:
        state = sd["optimizer"]["state"]
        for k, (b, lo, hi) in enumerate(sd["slices"]):
            full["param"][b][lo:hi] = sd["shard_fp32_params"][k].cpu()
            if k in state:
                full["exp_avg"][b][lo:hi] = state[k]["exp_avg"].cpu()
                full["exp_avg_sq"][b][lo:hi] = state[k]["exp_avg_sq"].cpu()
                step = state[k]["step"]
    return {**full, "step": step, "param_groups": shards[0]["optimizer"]["param_groups"],
            "grad_scaler": shards[0].get("grad_scaler")}
