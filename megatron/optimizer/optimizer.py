"""Megatron optimizers: fp32, and mixed precision with fp32 master weights.

Both step an inner AdamW over "main" params. ``step()`` takes the gradients
from ``param.main_grad`` (the DDP buffer; ``param.grad`` for a bare module),
unscales them and checks for inf/NaN when a loss scaler is used (the result is
max-reduced over the model- and data-parallel groups, so every rank skips the
same steps), clips by the global norm, steps, and copies the fp32 master
params back into the fp16/bf16 model params. Without a scaler (fp32, bf16) a
non-finite global grad norm (again agreed over all ranks) skips the step;
with ``clip_grad`` 0 there is no such check, as in Megatron.
"""

import torch

from megatron.mpu import distributed as mpu_distributed
from megatron.optimizer.clip_grads import (clip_grads_by_norm, count_zeros,
                                           counts_toward_norm, grad_norm_tensor)

# Param dtypes that get an fp32 master copy.
HALF_DTYPES = (torch.float16, torch.bfloat16)
_MASTER_ATTRS = ("tensor_model_parallel", "partition_dim", "sequence_parallel",
                 "tied_embedding", "shared_embedding")


def model_grad(param):
    """The accumulated gradient of a model param: ``main_grad`` if DDP made one."""
    g = getattr(param, "main_grad", None)
    return g if g is not None else param.grad


def unscale_and_check(grads, inv_scale, device):
    """Multiply ``grads`` by ``inv_scale`` in place; a 1-element tensor on
    ``device``, 1.0 if any grad holds an inf or NaN, else 0.0."""
    found_inf = torch.zeros(1, dtype=torch.float32, device=device)
    if grads:
        torch._amp_foreach_non_finite_check_and_unscale_(
            grads, found_inf, torch.full((1,), inv_scale, dtype=torch.float32, device=device))
    return found_inf


class MegatronOptimizer:
    """Base: the shared step (unscale, found-inf, clip, step, copy back).

    Subclasses build ``self.optimizer`` (the inner AdamW over main params, made
    by ``build_inner(param_groups)``) and ``self._main`` (list of
    ``(main_param, counts_toward_norm)``), and define
    ``_copy_model_grads_to_main_grads`` and ``_copy_main_params_to_model_params``.
    """

    is_sharded = False
    _norm_over_data_parallel = False

    def __init__(self, model_chunks, clip_grad=0.0, grad_scaler=None,
                 log_num_zeros_in_grad=False):
        self.optimizer = None
        self.model_chunks = list(model_chunks)
        self.clip_grad = float(clip_grad or 0.0)
        self.grad_scaler = grad_scaler
        self.log_num_zeros_in_grad = log_num_zeros_in_grad
        # Scalar collectives need a tensor on the model's device even on a
        # rank whose shard holds no gradient at all.
        first = next((p for c in self.model_chunks for p in c.parameters()), None)
        self._device = first.device if first is not None else torch.device("cpu")

    # -- API -----------------------------------------------------------------
    @property
    def param_groups(self):
        """The inner optimizer's param groups (the lr scheduler writes ``lr`` here)."""
        return self.optimizer.param_groups

    def get_loss_scale(self):
        """Current loss scale as a 0-dim fp32 tensor (1.0 without a scaler)."""
        return torch.tensor(self.grad_scaler.scale if self.grad_scaler else 1.0)

    def scale_loss(self, loss):
        """``loss`` times the loss scale: call once per micro batch, before backward."""
        if self.grad_scaler is None:
            return loss
        return loss * self.grad_scaler.scale

    def zero_grad(self, set_to_none=True):
        """Zero the DDP grad buffers and drop every ``.grad`` (model and master)."""
        for chunk in self.model_chunks:
            if hasattr(chunk, "zero_grad_buffer"):
                chunk.zero_grad_buffer()
            else:
                chunk.zero_grad(set_to_none=True)
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    @torch.no_grad()
    def step(self):
        """One optimizer step. Returns ``(update_successful, grad_norm, num_zeros)``;
        grad_norm (a 0-dim tensor: ``float()`` it to print) is None when clipping is
        off, num_zeros None unless logged. Reads one value back to the host: the
        found-inf flag with a loss scaler, else whether the norm is finite."""
        try:
            self._copy_model_grads_to_main_grads()
            main = [p for p, _ in self._main if p.grad is not None]
            grads = [p.grad for p in main]
            if self.grad_scaler is not None:
                found_inf = unscale_and_check(grads, self.grad_scaler.inv_scale, self._device)
                mpu_distributed.all_reduce_max_model_and_data_parallel(found_inf)
                found = bool(found_inf.item() > 0)
                self.grad_scaler.update(found)
                if found:
                    return False, None, None
            counted = [p.grad for p, c in self._main if c and p.grad is not None]
            device = self._device
            grad_norm = None
            if self.clip_grad > 0:
                grad_norm = grad_norm_tensor(counted, self._norm_over_data_parallel, device)
                if self.grad_scaler is None and self._nonfinite_anywhere(grad_norm, device):
                    # Without a scaler the norm is the inf/NaN check; DP
                    # replicas must agree to skip or they would diverge.
                    return False, grad_norm, None
                clip_grads_by_norm(grads, self.clip_grad, grad_norm)
            num_zeros = None
            if self.log_num_zeros_in_grad:
                num_zeros = count_zeros(counted, self._norm_over_data_parallel, device)
            self.optimizer.step()
            self._copy_main_params_to_model_params()
            return True, grad_norm, num_zeros
        finally:
            # Main grads may alias the DDP buffer; a stale .grad on a model
            # param would make autograd accumulate into it next time.
            for p, _ in self._main:
                p.grad = None

    @staticmethod
    def _nonfinite_anywhere(grad_norm, device):
        # The one host read of a step without a loss scaler: skip the update or not.
        flag = (~torch.isfinite(grad_norm)).to(device=device, dtype=torch.float32).reshape(1)
        mpu_distributed.all_reduce_max_model_and_data_parallel(flag)
        return bool(flag.item() > 0)

    def reload_model_params(self):
        """Refresh the fp32 masters from the model params: call after loading a
        model checkpoint without optimizer state (no-op when masters are the params)."""

    # -- checkpoint helpers -----------------------------------------------------
    def _scaler_state(self):
        return None if self.grad_scaler is None else self.grad_scaler.state_dict()

    def _load_scaler_state(self, state):
        if self.grad_scaler is not None and state is not None:
            self.grad_scaler.load_state_dict(state)


class FP32Optimizer(MegatronOptimizer):
    """fp32 training: AdamW steps the model params with ``grad = main_grad``.

    ``param_groups``: torch-style groups of model params; ``build_inner``
    makes the inner optimizer from them.
    """

    def __init__(self, param_groups, build_inner, model_chunks, clip_grad=0.0,
                 log_num_zeros_in_grad=False):
        super().__init__(model_chunks, clip_grad, None, log_num_zeros_in_grad)
        self.optimizer = build_inner(param_groups)
        self._main = [(p, counts_toward_norm(p))
                      for g in self.optimizer.param_groups for p in g["params"]]

    def _copy_model_grads_to_main_grads(self):
        for p, _ in self._main:
            g = model_grad(p)
            p.grad = None if g is None else (g if g.dtype == p.dtype else g.to(p.dtype))

    def _copy_main_params_to_model_params(self):
        pass

    def state_dict(self):
        """Inner optimizer state (Adam moments, step)."""
        return {"optimizer": self.optimizer.state_dict(), "grad_scaler": None}

    def load_state_dict(self, state_dict):
        """Restore the inner optimizer state."""
        self.optimizer.load_state_dict(state_dict["optimizer"])


class MixedPrecisionOptimizer(MegatronOptimizer):
    """fp16/bf16 model params with fp32 master copies inside the optimizer.

    ``param_groups`` hold the *model* params; each half-precision one is
    replaced by an fp32 master copy in the groups given to ``build_inner``
    (fp32 model params are stepped directly).
    """

    def __init__(self, param_groups, build_inner, model_chunks, clip_grad=0.0,
                 grad_scaler=None, log_num_zeros_in_grad=False):
        super().__init__(model_chunks, clip_grad, grad_scaler, log_num_zeros_in_grad)
        self._pairs = []  # (model_param, master_param) for half-precision params
        self._main = []
        self._model_of = {}
        master_groups = []
        for group in param_groups:
            masters = []
            for p in group["params"]:
                if p.dtype in HALF_DTYPES:
                    master = p.detach().float()  # a copy: p is fp16/bf16
                    for attr in _MASTER_ATTRS:
                        if hasattr(p, attr):
                            setattr(master, attr, getattr(p, attr))
                    self._pairs.append((p, master))
                else:
                    master = p
                self._model_of[master] = p
                self._main.append((master, counts_toward_norm(p)))
                masters.append(master)
            master_groups.append({**group, "params": masters})
        self.optimizer = build_inner(master_groups)

    def _copy_model_grads_to_main_grads(self):
        for master, _ in self._main:
            g = model_grad(self._model_of[master])
            master.grad = None if g is None else (g if g.dtype == torch.float32 else g.float())

    def _copy_main_params_to_model_params(self):
        if self._pairs:
            torch._foreach_copy_([p for p, _ in self._pairs], [m for _, m in self._pairs])

    @torch.no_grad()
    def reload_model_params(self):
        """Refresh the fp32 masters from the (just loaded) model params."""
        for p, m in self._pairs:
            m.copy_(p)

    def state_dict(self):
        """Inner optimizer state, scaler state and the fp32 master params."""
        return {"optimizer": self.optimizer.state_dict(),
                "grad_scaler": self._scaler_state(),
                "fp32_from_fp16_params": [m for _, m in self._pairs]}

    def load_state_dict(self, state_dict):
        """Restore Adam state, scaler and fp32 masters (bit for bit), then the model params."""
        masters = state_dict.get("fp32_from_fp16_params")
        if masters is None or len(masters) != len(self._pairs):
            raise ValueError(
                f"optimizer checkpoint holds {0 if masters is None else len(masters)} fp32 "
                f"master params but this model has {len(self._pairs)} half-precision params")
        for (_, m), saved in zip(self._pairs, masters):
            if tuple(saved.shape) != tuple(m.shape):
                raise ValueError(f"optimizer checkpoint master param of shape "
                                 f"{tuple(saved.shape)} does not match {tuple(m.shape)}")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._load_scaler_state(state_dict.get("grad_scaler"))
        with torch.no_grad():
            for (_, m), saved in zip(self._pairs, masters):
                m.copy_(saved)
            self._copy_main_params_to_model_params()
