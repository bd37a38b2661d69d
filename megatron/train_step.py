"""One optimizer step on this rank, and the scalars every rank agrees on after it.

``StepSchedule`` fixes how a global batch runs here (which schedule, how many
micro batches, the shape of what pipeline stages exchange); ``train_step`` runs
it, syncs the gradients and steps the optimizer and learning rate;
``step_scalars`` shares the step's loss and the stop flags with one all-reduce.
The training loop, the benchmarks and the dry run all step through here.
"""
from dataclasses import dataclass
from typing import Callable

import torch

from megatron import mpu
from megatron.mpu import p2p_communication as p2p
from megatron.mpu.distributed import finalize_model_grads
from megatron.utils import DTYPES


@dataclass
class StepSchedule:
    """The schedule of one global batch on this rank and its fixed arguments."""
    forward_backward: Callable
    num_microbatches: int
    tensor_shape: tuple  # what pipeline stages send each other: [s(/tp), b, h]
    dtype: torch.dtype

    @classmethod
    def from_config(cls, cfg):
        """The schedule for ``cfg`` under the current mpu layout (groups must exist)."""
        from megatron.schedules import get_forward_backward_func
        t = cfg.training
        dp = mpu.get_data_parallel_world_size()
        shape = p2p.pipeline_tensor_shape(
            cfg.model.seq_length, t.micro_batch_size, cfg.model.hidden_size,
            cfg.parallel.sequence_parallel and mpu.get_tensor_model_parallel_world_size() > 1)
        return cls(get_forward_backward_func(), t.global_batch_size // (t.micro_batch_size * dp),
                   shape, DTYPES[t.precision])

    def run(self, forward_step_func, data_iterator, model_chunks, forward_only=False,
            grad_scale_func=None):
        """Forward (and backward) every micro batch; the last stage's loss dicts."""
        return self.forward_backward(
            forward_step_func, data_iterator, model_chunks, self.num_microbatches,
            tensor_shape=self.tensor_shape, dtype=self.dtype, forward_only=forward_only,
            grad_scale_func=grad_scale_func)


@dataclass
class StepResult:
    """What one ``train_step`` did: the last stage's per-micro-batch loss dicts, whether
    the optimizer applied the update (False when fp16 found inf/nan), and the global
    gradient norm before clipping (None when clipping is off)."""
    loss_dicts: list
    update_successful: bool
    grad_norm: object


def train_step(schedule, forward_step_func, data_iterator, model_chunks, optimizer, scheduler):
    """One optimizer step over a global batch: zero the grads, run the schedule, sync the
    gradients (TP / embedding sums, DP average), step the optimizer, then the learning
    rate (a skipped fp16 step does not advance it, as in Megatron)."""
    # Also zeroes every chunk's DDP grad buffer (MegatronOptimizer.zero_grad).
    optimizer.zero_grad()
    loss_dicts = schedule.run(forward_step_func, data_iterator, model_chunks,
                              grad_scale_func=optimizer.scale_loss)
    finalize_model_grads(model_chunks)
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(1)
    return StepResult(loss_dicts, update_successful, grad_norm)


def _reduction_dtype(device):
    # float64 where it is cheap (CPU); accelerators reduce float32.
    return torch.float64 if device.type == "cpu" else torch.float32


def mean_loss(loss_dicts, device, key="lm loss"):
    """Mean of the micro batches' ``key`` losses as one 0-d tensor on ``device`` (no host
    sync); NaN when no micro batch reported the key (not the last pipeline stage)."""
    dtype = _reduction_dtype(device)
    values = [torch.as_tensor(d[key]).detach().reshape(()).to(device=device, dtype=torch.float64)
              for d in loss_dicts if key in d]
    if not values:
        return torch.full((), float("nan"), dtype=dtype, device=device)
    return torch.stack(values).mean().to(dtype)


def step_scalars(loss_dicts, is_last_stage, flags, device):
    """One all-reduce and one host transfer per iteration for every per-step scalar.

    Returns ``(loss, flags)``, agreed by every rank: ``loss`` is the iteration's lm
    loss averaged over data parallelism (each last-stage rank contributes its
    micro-batch mean / its number of replicas, i.e. world / PP; a non-finite loss
    anywhere makes it non-finite everywhere), ``flags`` the given stop flags OR-ed
    over all ranks, so that every rank stops together.
    """
    world = mpu.get_global_world_size()
    if is_last_stage:
        loss = mean_loss(loss_dicts, device)
        if world > 1:
            loss = loss / (world // mpu.get_pipeline_model_parallel_world_size())
    else:
        loss = torch.zeros((), dtype=_reduction_dtype(device), device=device)
    flag_values = torch.tensor([float(f) for f in flags], dtype=loss.dtype, device=device)
    scalars = mpu.all_reduce(torch.cat([loss.reshape(1), flag_values]))  # SUM
    loss, *summed = scalars.tolist()
    return loss, [s > 0 for s in summed]
