"""Forward/backward schedules: run the micro batches of one global batch on this rank.

Three schedules with one signature, ``(forward_step_func, data_iterator, model,
num_microbatches, *, tensor_shape, dtype, forward_only=False,
grad_scale_func=None, trace=None) -> list of loss dicts``;
``get_forward_backward_func`` picks one from the pipeline layout:

- ``forward_backward_no_pipelining``: one model chunk, micro batches one after
  the other (``tensor_shape`` / ``dtype`` are not needed and ignored).
- ``forward_backward_pipelining_without_interleaving`` (PipeDream-Flush /
  1F1B): stage ``r`` of ``p`` runs ``min(p - r - 1, m)`` warm-up forwards, then
  alternates one forward and one backward, then drains the remaining
  backwards. A stage never holds the activations of more than ``p - r`` micro
  batches (GPipe holds all ``m``).
- ``forward_backward_pipelining_with_interleaving``: each rank holds ``v``
  model chunks (virtual stages); chunk ``c`` on rank ``r`` is global stage
  ``c * p + r``. Micro batches go through the chunks in groups of ``p``, which
  shrinks the bubble by ``v`` at the price of ``v`` times more communication.
  Which step runs what and receives what is ``schedule_plan.interleaved_steps``.

All three share ``forward_step`` and ``backward_step``: on the last stage each
micro batch's loss is divided by ``num_microbatches`` and multiplied by
``grad_scale_func`` once, before backward; the loss dicts returned by
``loss_func`` are collected and returned there (empty elsewhere). Gradients
accumulate into the parameters (``main_grad`` with the project's DDP); the
caller runs ``mpu.distributed.finalize_model_grads`` afterwards.

The caller gives the shape and dtype of the hidden states sent between stages
(``p2p_communication.pipeline_tensor_shape``, the precision's dtype); the
device is the model's. Once a stage's output has been sent on, its storage is
released (only its autograd graph is kept for the backward), as Megatron-LM's
``deallocate_output_tensor`` does: a stage holding ``k`` micro batches in
flight then holds ``k`` fewer ``[s, b, h]`` activations.

An optional ``trace`` (``ScheduleTrace``) records the order of forward and
backward steps and the most micro batches held at once, for tests and
benchmarks.
"""
import contextlib
import functools
import itertools
from collections import deque
from dataclasses import dataclass, field

import torch

from megatron import schedule_plan as plan
from megatron.mpu import p2p_communication as p2p
from megatron.mpu import parallel_state as ps
from megatron.utils import unwrap_model


@dataclass
class ScheduleTrace:
    """What one schedule call did on this rank.

    ``steps`` lists ``("F" | "B", chunk, microbatch)`` in execution order;
    ``max_in_flight`` is the most (chunk, micro batch) forwards whose
    activations were held at once, counted from the schedule's own buffers.
    """
    steps: list = field(default_factory=list)
    max_in_flight: int = 0

    def _record(self, kind, chunk, microbatch, in_flight):
        self.steps.append((kind, chunk, microbatch))
        self.max_in_flight = max(self.max_in_flight, in_flight)


# ---- the shared steps ----------------------------------------------------------

def forward_step(forward_step_func, data_iterator, chunk, input_tensor, num_microbatches,
                 losses):
    """Run one chunk on one micro batch.

    Returns the loss to backpropagate on the last stage, already divided by
    ``num_microbatches`` (so the summed grads of all micro batches are the grad
    of the mean; its loss dict goes to ``losses``), the chunk's output elsewhere.
    """
    unwrap_model(chunk).set_input_tensor(input_tensor)
    output_tensor, loss_func = forward_step_func(data_iterator, chunk)
    if ps.is_pipeline_last_stage():
        loss, loss_dict = loss_func(output_tensor)
        output_tensor = loss / num_microbatches
        losses.append(loss_dict)
    return output_tensor


def backward_step(input_tensor, output_tensor, output_tensor_grad, grad_scale_func):
    """Backpropagate one micro batch through one chunk; return the input's grad.

    ``output_tensor_grad`` None means ``output_tensor`` is the loss: it is scaled
    once by ``grad_scale_func`` (the optimizer's loss scale) first.
    """
    if output_tensor_grad is None and grad_scale_func is not None:
        output_tensor = grad_scale_func(output_tensor)
    if output_tensor_grad is not None and output_tensor.shape != output_tensor_grad.shape:
        # Released after sending: start from its graph node, which knows the shape.
        torch.autograd.backward(torch.autograd.graph.get_gradient_edge(output_tensor),
                                grad_tensors=output_tensor_grad)
    else:
        torch.autograd.backward(output_tensor, grad_tensors=output_tensor_grad)
    if input_tensor is None:
        return None
    if input_tensor.grad is None:
        # A stage that ignores its input still owes the previous stage a
        # gradient: without one the previous stage would wait forever.
        return torch.zeros_like(input_tensor)
    return input_tensor.grad


@functools.lru_cache(maxsize=None)
def _can_release_outputs():
    """Whether this torch runs backward from a GradientEdge (torch >= 2.4), which is what
    lets an output whose storage was released still be backpropagated (checked once)."""
    try:
        x = torch.ones(2, requires_grad=True)
        y = x * 2.0
        edge = torch.autograd.graph.get_gradient_edge(y)
        y.data = torch.empty(1)
        torch.autograd.backward(edge, grad_tensors=torch.ones(2))
        return x.grad is not None and x.grad.tolist() == [2.0, 2.0]
    except (AttributeError, RuntimeError, TypeError):
        return False


def _release_output(output_tensor):
    """Free the storage of an output already sent to the next stage.

    Its autograd node keeps the shape for the backward; a view (whose storage
    another tensor owns) or a tensor outside autograd is left alone. An op that
    saved its own output for backward keeps that storage alive itself, so this
    can never change a gradient, only fail to save memory.
    """
    if (output_tensor is None or output_tensor.grad_fn is None or output_tensor._base is not None
            or not _can_release_outputs()):
        return
    output_tensor.data = torch.empty((1,), dtype=output_tensor.dtype, device=output_tensor.device)


def _chunks(model):
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _single_chunk(model, data_iterator, schedule):
    """The one model chunk and data iterator of a schedule that runs one chunk per rank."""
    chunks = _chunks(model)
    if len(chunks) != 1:
        raise ValueError(f"the {schedule} schedule runs one model chunk per rank, "
                         f"got {len(chunks)}")
    if isinstance(data_iterator, (list, tuple)):
        data_iterator = data_iterator[0]
    return chunks[0], data_iterator


def _tensor_spec(chunk, tensor_shape, dtype):
    """What travels between stages: the caller's shape and dtype on the model's device."""
    if (not isinstance(tensor_shape, (tuple, list)) or len(tensor_shape) != 3
            or not all(isinstance(n, int) and n > 0 for n in tensor_shape)):
        raise ValueError(f"the pipeline schedules need tensor_shape=(s, b, h), three positive "
                         f"ints (p2p_communication.pipeline_tensor_shape), got {tensor_shape!r}")
    device = next((q.device for q in chunk.parameters()), torch.device("cpu"))
    return p2p.TensorSpec(tuple(tensor_shape), dtype, device)


# ---- no pipelining --------------------------------------------------------------

def forward_backward_no_pipelining(forward_step_func, data_iterator, model, num_microbatches, *,
                                   tensor_shape, dtype, forward_only=False, grad_scale_func=None,
                                   trace=None):
    """Run ``num_microbatches`` forward(+backward) passes on one model chunk.

    Returns the list of per-micro-batch loss dicts. ``tensor_shape`` and
    ``dtype`` are ignored (nothing is sent) but required, as by the pipelined
    schedules, so that a call that runs here also runs with PP > 1. The DP
    grad sync is deliberately not triggered here: the DDP wrapper accumulates
    into its grad buffer and the training loop calls ``finalize_model_grads``
    once.
    """
    chunk, data_iterator = _single_chunk(model, data_iterator, "non-pipelined")
    losses = []
    context = torch.no_grad() if forward_only else contextlib.nullcontext()
    for i in range(num_microbatches):
        with context:
            loss = forward_step(forward_step_func, data_iterator, chunk, None, num_microbatches,
                                losses)
        if trace is not None:
            trace._record("F", 0, i, 1)
        if not forward_only:
            backward_step(None, loss, None, grad_scale_func)
            if trace is not None:
                trace._record("B", 0, i, 0)
    return losses


# ---- 1F1B -----------------------------------------------------------------------

def forward_backward_pipelining_without_interleaving(
        forward_step_func, data_iterator, model, num_microbatches, *, tensor_shape, dtype,
        forward_only=False, grad_scale_func=None, trace=None):
    """1F1B schedule over one model chunk per rank; returns the last stage's loss dicts."""
    chunk, data_iterator = _single_chunk(model, data_iterator, "non-interleaved pipeline")
    spec = _tensor_spec(chunk, tensor_shape, dtype)
    num_stages = ps.get_pipeline_model_parallel_world_size()
    stage = ps.get_pipeline_model_parallel_rank()
    m = int(num_microbatches)
    losses = []

    if forward_only:
        with torch.no_grad():
            for i in range(m):
                input_tensor = p2p.recv_forward(spec)
                output_tensor = forward_step(forward_step_func, data_iterator, chunk,
                                             input_tensor, m, losses)
                if trace is not None:
                    trace._record("F", 0, i, 1)
                p2p.send_forward(output_tensor, spec)
        return losses

    num_warmup = min(num_stages - stage - 1, m)
    num_steady = m - num_warmup
    held = deque()  # (microbatch, input_tensor, output_tensor) awaiting backward
    next_forward = 0

    def forward(input_tensor):
        nonlocal next_forward
        output_tensor = forward_step(forward_step_func, data_iterator, chunk, input_tensor, m,
                                     losses)
        held.append((next_forward, input_tensor, output_tensor))
        if trace is not None:
            trace._record("F", 0, next_forward, len(held))
        next_forward += 1
        return output_tensor

    def backward(output_tensor_grad):
        microbatch, input_tensor, output_tensor = held.popleft()
        input_tensor_grad = backward_step(input_tensor, output_tensor, output_tensor_grad,
                                          grad_scale_func)
        if trace is not None:
            trace._record("B", 0, microbatch, len(held))
        return input_tensor_grad

    last_stage = ps.is_pipeline_last_stage()
    for _ in range(num_warmup):
        output_tensor = forward(p2p.recv_forward(spec))
        p2p.send_forward(output_tensor, spec)
        _release_output(output_tensor)

    input_tensor = p2p.recv_forward(spec) if num_steady > 0 else None
    for i in range(num_steady):
        output_tensor = forward(input_tensor)
        output_tensor_grad = p2p.send_forward_recv_backward(output_tensor, spec)
        if not last_stage:  # there the output is the loss, which nothing sent
            _release_output(output_tensor)
        input_tensor_grad = backward(output_tensor_grad)
        if i == num_steady - 1:
            p2p.send_backward(input_tensor_grad, spec)
        else:
            input_tensor = p2p.send_backward_recv_forward(input_tensor_grad, spec)

    for _ in range(num_warmup):
        input_tensor_grad = backward(p2p.recv_backward(spec))
        p2p.send_backward(input_tensor_grad, spec)
    return losses


# ---- interleaved 1F1B -----------------------------------------------------------

def _iterators_per_chunk(data_iterator, num_chunks):
    """One iterator per model chunk.

    A list is taken as given. A single iterator is split with ``tee`` so that
    each chunk's k-th forward sees micro batch k whether the forward step draws
    a batch on every chunk or only where it needs one (first / last stage);
    the source advances by ``num_microbatches`` either way.
    """
    if isinstance(data_iterator, (list, tuple)):
        if len(data_iterator) != num_chunks:
            raise ValueError(f"got {len(data_iterator)} data iterators for {num_chunks} "
                             f"model chunks")
        return list(data_iterator)
    if data_iterator is None:
        return [None] * num_chunks
    return list(itertools.tee(data_iterator, num_chunks))


def forward_backward_pipelining_with_interleaving(
        forward_step_func, data_iterator, model, num_microbatches, *, tensor_shape, dtype,
        forward_only=False, grad_scale_func=None, trace=None):
    """Interleaved 1F1B over ``v`` model chunks per rank; returns the last stage's loss dicts.

    ``model`` is the list of this rank's chunks (chunk ``c`` is global stage
    ``c * p + rank``); ``num_microbatches`` must be a multiple of the pipeline
    size; ``data_iterator`` may be one iterator per chunk.
    """
    chunks = _chunks(model)
    v = len(chunks)
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if vpp != v:
        raise ValueError(f"the interleaved schedule got {v} model chunks but "
                         f"virtual_pipeline_model_parallel_size is {vpp}")
    p = ps.get_pipeline_model_parallel_world_size()
    rank = ps.get_pipeline_model_parallel_rank()
    m = int(num_microbatches)
    if m % p != 0:
        raise ValueError(f"the interleaved pipeline schedule needs num_microbatches ({m}) to be "
                         f"a multiple of pipeline_model_parallel_size ({p})")
    iterators = _iterators_per_chunk(data_iterator, v)
    spec = _tensor_spec(chunks[0], tensor_shape, dtype)
    losses = []
    # Per chunk, in micro batch order: the inputs and outputs of the forwards
    # awaiting their backward, and the output grads received for them.
    inputs = [[] for _ in range(v)]
    outputs = [[] for _ in range(v)]
    output_grads = [[] for _ in range(v)]

    def forward(k):
        """Forward step k; returns what to send on (None on the last stage: a loss)."""
        c = plan.forward_chunk(k, p, v)
        ps.set_virtual_pipeline_model_parallel_rank(c)
        if ps.is_pipeline_first_stage() and len(inputs[c]) == len(outputs[c]):
            inputs[c].append(None)  # the first stage reads data, it receives nothing
        output_tensor = forward_step(forward_step_func, iterators[c], chunks[c], inputs[c][-1],
                                     m, losses)
        outputs[c].append(output_tensor)
        if trace is not None:
            trace._record("F", c, plan.microbatch(k, p, v), sum(len(o) for o in outputs))
        if forward_only:
            inputs[c].pop()
            outputs[c].pop()
        return None if ps.is_pipeline_last_stage() else output_tensor

    def backward(k):
        """Backward step k; returns the input grad to send back (None on the first stage)."""
        c = plan.backward_chunk(k, p, v)
        ps.set_virtual_pipeline_model_parallel_rank(c)
        if ps.is_pipeline_last_stage() and not output_grads[c]:
            output_grads[c].append(None)  # the loss: backward starts here
        input_tensor_grad = backward_step(inputs[c].pop(0), outputs[c].pop(0),
                                          output_grads[c].pop(0), grad_scale_func)
        if trace is not None:
            trace._record("B", c, plan.microbatch(k, p, v), sum(len(o) for o in outputs))
        return input_tensor_grad

    saved_virtual_rank = ps.get_virtual_pipeline_model_parallel_rank()
    try:
        with torch.no_grad() if forward_only else contextlib.nullcontext():
            for step in plan.interleaved_steps(p, v, rank, m, forward_only):
                output_tensor = forward(step.forward) if step.forward is not None else None
                input_tensor_grad = backward(step.backward) if step.backward is not None else None
                input_tensor, output_tensor_grad = \
                    p2p.send_forward_backward_recv_forward_backward(
                        output_tensor, input_tensor_grad, step.input_chunk is not None,
                        step.grad_chunk is not None, spec)
                _release_output(output_tensor)
                if step.input_chunk is not None:
                    inputs[step.input_chunk].append(input_tensor)
                if step.grad_chunk is not None:
                    output_grads[step.grad_chunk].append(output_tensor_grad)
    finally:
        ps.set_virtual_pipeline_model_parallel_rank(saved_virtual_rank)
    return losses


def get_forward_backward_func():
    """The schedule for the current pipeline layout (from mpu.parallel_state)."""
    if ps.get_pipeline_model_parallel_world_size() > 1:
        if ps.get_virtual_pipeline_model_parallel_world_size() not in (None, 1):
            return forward_backward_pipelining_with_interleaving
        return forward_backward_pipelining_without_interleaving
    return forward_backward_no_pipelining
