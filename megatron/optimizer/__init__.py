"""Optimizers for GPT pretraining: fp32 / fp16 / bf16 with fp32 master weights,
loss scaling, model-parallel gradient clipping, ZeRO-1 sharding, lr schedule.

``get_megatron_optimizer(cfg, model_chunks)`` picks the right one from
``cfg.training.precision``, ``cfg.optimizer`` and ``cfg.parallel.distributed_optimizer``.
"""
import functools

import torch

from megatron.optimizer.distributed_optimizer import (DistributedOptimizer, clone_if_tensor,
                                                      full_state_from_shards)
from megatron.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron.optimizer.lr_scheduler import OptimizerParamScheduler
from megatron.optimizer.optimizer import (HALF_DTYPES, FP32Optimizer, MegatronOptimizer,
                                          MixedPrecisionOptimizer)

__all__ = ["get_megatron_optimizer", "MegatronOptimizer", "FP32Optimizer",
           "MixedPrecisionOptimizer", "DistributedOptimizer", "ConstantGradScaler",
           "DynamicGradScaler", "OptimizerParamScheduler", "get_param_groups",
           "is_no_weight_decay", "HALF_DTYPES", "clone_if_tensor", "full_state_from_shards"]


def is_no_weight_decay(name, param):
    """True for the params trained without weight decay: biases and other 1-D
    tensors (LayerNorm weights). ``param`` may be a parameter or a saved tensor."""
    return name.endswith(".bias") or param.dim() == 1


def get_param_groups(model_chunks, weight_decay):
    """Two groups over the trainable params of all chunks: with weight decay,
    and without it (``is_no_weight_decay``)."""
    decay, no_decay, seen = [], [], set()
    for chunk in model_chunks:
        for name, p in chunk.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if is_no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": float(weight_decay)},
            {"params": no_decay, "weight_decay": 0.0}]


@functools.lru_cache(maxsize=None)
def _announce(text):
    """Print which AdamW implementation is used, once per process for each choice."""
    from megatron.logging import print_rank_0
    print_rank_0(f"> optimizer: {text}")


def adamw_builder(optimizer_cfg, device):
    """A function ``param_groups -> AdamW``: apex FusedAdam if importable (CUDA), else
    torch's fused AdamW where this torch has one for the device, else its foreach AdamW."""
    kwargs = dict(lr=float(optimizer_cfg.lr), weight_decay=float(optimizer_cfg.weight_decay),
                  betas=(float(optimizer_cfg.adam_beta1), float(optimizer_cfg.adam_beta2)),
                  eps=float(optimizer_cfg.adam_eps))
    try:
        from apex.optimizers import FusedAdam  # optional; this project never installs apex
    except Exception:
        FusedAdam = None
    if FusedAdam is not None and device.type == "cuda":
        _announce("apex FusedAdam (AdamW mode)")
        return lambda groups: FusedAdam(groups, adam_w_mode=True, **kwargs)
    if _fused_adamw_supported(device.type):
        # On CPU too (torch >= 2.4): one pass per tensor, measured 4-5x faster than
        # foreach=True there (bench/RESULTS.md).
        _announce(f"torch.optim.AdamW(fused=True) on {device.type}")
        return lambda groups: torch.optim.AdamW(groups, fused=True, **kwargs)
    _announce(f"torch.optim.AdamW(foreach=True) on {device.type}")
    return lambda groups: torch.optim.AdamW(groups, foreach=True, **kwargs)


@functools.lru_cache(maxsize=None)
def _fused_adamw_supported(device_type):
    """Whether this torch has a fused AdamW for ``device_type`` (CPU's arrived in torch 2.4);
    probed once per device type."""
    try:
        param = torch.zeros(1, device=device_type, requires_grad=True)
        param.grad = torch.zeros_like(param)
        torch.optim.AdamW([param], fused=True).step()
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def get_megatron_optimizer(cfg, model_chunks, log_num_zeros_in_grad=False):
    """Build the optimizer for ``model_chunks`` (DDP-wrapped or bare modules).

    fp32: AdamW on the model params; fp16: fp32 masters and a dynamic loss
    scaler (constant when ``optimizer.loss_scale`` is set); bf16: fp32 masters,
    no scaler. ``parallel.distributed_optimizer`` shards masters and Adam state
    over DP.
    """
    if not isinstance(model_chunks, (list, tuple)):
        model_chunks = [model_chunks]
    ocfg = cfg.optimizer
    precision = cfg.training.precision
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"training.precision must be fp32, fp16 or bf16, got {precision!r}")
    params = [p for c in model_chunks for p in c.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = get_param_groups(model_chunks, ocfg.weight_decay)
    build_inner = adamw_builder(ocfg, params[0].device)

    scaler = None
    if precision == "fp16":
        if ocfg.loss_scale:
            scaler = ConstantGradScaler(ocfg.loss_scale)
        else:
            scaler = DynamicGradScaler(initial_scale=ocfg.initial_loss_scale,
                                       min_scale=ocfg.min_loss_scale,
                                       growth_factor=2.0, backoff_factor=0.5,
                                       growth_interval=ocfg.loss_scale_window,
                                       hysteresis=ocfg.hysteresis)
    common = dict(clip_grad=ocfg.clip_grad, log_num_zeros_in_grad=log_num_zeros_in_grad)
    if cfg.parallel.distributed_optimizer:
        return DistributedOptimizer(groups, build_inner, model_chunks, grad_scaler=scaler, **common)
    if precision == "fp32":
        return FP32Optimizer(groups, build_inner, model_chunks, **common)
    return MixedPrecisionOptimizer(groups, build_inner, model_chunks, grad_scaler=scaler, **common)
