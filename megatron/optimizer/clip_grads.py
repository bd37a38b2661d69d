"""Global gradient norm across model-parallel ranks, and clipping by it."""
import torch

from megatron.mpu import distributed as mpu_distributed
from megatron.mpu import parallel_state


def counts_toward_norm(param):
    """Whether ``param``'s grad enters the global norm on this rank.

    Params replicated over TP (``tensor_model_parallel`` False) count on TP rank 0
    only; the last stage's copy of the tied embedding (``shared_embedding``)
    not at all, since the first stage counts it.
    """
    if getattr(param, "shared_embedding", False):
        return False
    if getattr(param, "tensor_model_parallel", False):
        return True
    return parallel_state.get_tensor_model_parallel_rank() == 0


def _sum_of_squares(grads):
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
    return torch.stack(norms).pow(2).sum()


def grad_norm_tensor(grads_for_norm, include_data_parallel=False, device=None):
    """L2 norm of the grads of all model-parallel ranks (and DP shards when
    ``include_data_parallel``: the distributed optimizer's disjoint shards).

    ``grads_for_norm`` are this rank's counted grads. Returns a 0-dim float64 tensor
    on ``device`` (inf or nan when a grad is not finite), equal on every rank, without
    waiting for it on the host.
    """
    total = _sum_of_squares(grads_for_norm).to(torch.float32)
    if device is not None:
        total = total.to(device)
    mpu_distributed.all_reduce_sum_model_parallel(total, include_data_parallel)
    return total.double().sqrt()


def get_grad_norm(grads_for_norm, include_data_parallel=False, device=None):
    """``grad_norm_tensor`` as a Python float (a host sync)."""
    return float(grad_norm_tensor(grads_for_norm, include_data_parallel, device))


def clip_grads_by_norm(grads, max_norm, total_norm):
    """Scale ``grads`` in place so their global norm ``total_norm`` (``grad_norm_tensor``'s
    0-dim tensor) is at most ``max_norm``, where the norm lives: no host sync."""
    if not grads:
        return
    # Multiplying by exactly 1.0 where no clipping is due leaves the grads as they are.
    clip_coeff = torch.clamp(max_norm / (total_norm + 1.0e-6), max=1.0)
    torch._foreach_mul_(grads, clip_coeff.to(grads[0].device))


def count_zeros(grads_for_norm, include_data_parallel=False, device=None):
    """Number of zero entries in the counted grads over all model-parallel ranks."""
    total = torch.zeros((), dtype=torch.float32)
    for g in grads_for_norm:
        total += (g.numel() - torch.count_nonzero(g)).cpu().float()
    if device is not None:
        total = total.to(device)
    mpu_distributed.all_reduce_sum_model_parallel(total, include_data_parallel)
    return int(total.item())
