"""Forward/backward schedules: run the micro batches of one global batch on this rank.

Only the non-pipelined schedule lives here for now; `get_forward_backward_func`
picks the schedule from the pipeline layout. Gradient synchronization over DP
happens afterwards, in `mpu.distributed.finalize_model_grads`.
"""
import contextlib

import torch


def _unwrap_list(model):
    return model if isinstance(model, (list, tuple)) else [model]


def forward_step(forward_step_func, data_iterator, model, num_microbatches, losses_reduced):
    """One micro batch: run the model, compute the loss, divide it by num_microbatches.

    Returns the loss tensor to backpropagate (already divided) on the last stage,
    the model output otherwise.
    """
    output_tensor, loss_func = forward_step_func(data_iterator, model)
    loss, loss_dict = loss_func(output_tensor)
    losses_reduced.append(loss_dict)
    # Dividing here makes the summed grads of all micro batches equal the grad of the mean.
    return loss / num_microbatches


def backward_step(output_tensor, grad_scale_func=None):
    """Backpropagate a scalar loss, scaled once by the optimizer's loss scale."""
    if grad_scale_func is not None:
        output_tensor = grad_scale_func(output_tensor)
    torch.autograd.backward(output_tensor)


def forward_backward_no_pipelining(forward_step_func, data_iterator, model, num_microbatches,
                                   seq_length=None, micro_batch_size=None, forward_only=False,
                                   grad_scale_func=None, *, tensor_shape=None, dtype=None,
                                   trace=None):
    """Run `num_microbatches` forward(+backward) passes on one model chunk.

    Returns the list of per-micro-batch loss dicts. The DP grad sync is
    deliberately not triggered here: the DDP wrapper accumulates into its grad
    buffer and the training loop calls `finalize_model_grads` once.
    """
    chunks = _unwrap_list(model)
    if len(chunks) != 1:
        raise ValueError(f"non-pipelined schedule needs exactly one model chunk, got {len(chunks)}")
    chunk = chunks[0]
    losses_reduced = []
    context = torch.no_grad() if forward_only else contextlib.nullcontext()
    for _ in range(num_microbatches):
        with context:
            loss = forward_step(forward_step_func, data_iterator, chunk, num_microbatches,
                                losses_reduced)
        if not forward_only:
            backward_step(loss, grad_scale_func)
    return losses_reduced


def get_forward_backward_func():
    """The schedule for the current pipeline layout (from mpu.parallel_state)."""
    from megatron import mpu
    if mpu.get_pipeline_model_parallel_world_size() > 1:
        try:
            from megatron import pipeline_schedules
        except ImportError:
            raise NotImplementedError(
                "pipeline_model_parallel_size > 1 needs the pipelined schedules "
                "(megatron/pipeline_schedules.py), which are not available") from None
        if mpu.get_virtual_pipeline_model_parallel_world_size() not in (None, 1):
            return pipeline_schedules.forward_backward_pipelining_with_interleaving
        return pipeline_schedules.forward_backward_pipelining_without_interleaving
    return forward_backward_no_pipelining
