"""Pipeline-parallel forward/backward schedules: 1F1B and interleaved 1F1B.

Both functions have the signature of the contract's ``forward_backward_func``
(see ``schedules.get_forward_backward_func``) and run one global batch of
``num_microbatches`` micro batches through this rank's pipeline stage:

- ``forward_backward_pipelining_without_interleaving`` (PipeDream-Flush /
  1F1B): stage ``r`` of ``p`` runs ``min(p - r - 1, m)`` warm-up forwards, then
  alternates one forward and one backward, then drains the remaining
  backwards. A stage never holds the activations of more than ``p - r`` micro
  batches (GPipe holds all ``m``).
- ``forward_backward_pipelining_with_interleaving``: each rank holds ``v``
  model chunks (virtual stages); chunk ``c`` on rank ``r`` is global stage
  ``c * p + r``. Micro batches go through the chunks in groups of ``p``, which
  shrinks the bubble by ``v`` at the price of ``v`` times more communication.

On the last stage each micro batch's loss is divided by ``num_microbatches``
and multiplied by ``grad_scale_func`` once, before backward; the loss dicts
returned by ``loss_func`` are collected and returned there (empty elsewhere).
Gradients accumulate into the parameters (``main_grad`` with the project's
DDP); the caller runs ``finalize_model_grads`` afterwards.

Once a stage's output has been sent on, its storage is released (only its
autograd graph is kept for the backward), as Megatron-LM's
``deallocate_output_tensor`` does: a stage holding ``k`` micro batches in flight
then holds ``k`` fewer ``[s, b, h]`` activations.

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

from megatron.mpu import p2p_communication as p2p
from megatron.mpu import parallel_state as ps
from megatron.utils import DTYPES, unwrap_model


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


def _find_config(module):
    while True:
        cfg = getattr(module, "cfg", None) or getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "model") and hasattr(cfg, "parallel"):
            return cfg
        if not hasattr(module, "module"):
            return None
        module = module.module


def _tensor_spec(chunk, seq_length, micro_batch_size, tensor_shape, dtype):
    """Shape, dtype and device of what this pipeline sends between stages.

    Taken from the model's config (hidden size, sequence parallelism,
    precision) unless the caller gives ``tensor_shape`` / ``dtype``.
    """
    cfg = _find_config(chunk)
    if tensor_shape is None:
        if cfg is None:
            raise ValueError("the pipeline schedule needs the shape of the tensors passed between "
                             "stages: give tensor_shape=(s, b, h) or a model with a .cfg Config")
        tensor_shape = p2p.pipeline_tensor_shape(seq_length, micro_batch_size,
                                                 cfg.model.hidden_size,
                                                 cfg.parallel.sequence_parallel)
    if dtype is None:
        if cfg is not None:
            dtype = DTYPES.get(getattr(cfg.training, "precision", "fp32"), torch.float32)
        else:
            dtype = next((q.dtype for q in chunk.parameters() if q.is_floating_point()),
                         torch.float32)
    device = next((q.device for q in chunk.parameters()), torch.device("cpu"))
    return p2p.TensorSpec(tuple(tensor_shape), dtype, device)


def _forward_step(forward_step_func, data_iterator, chunk, input_tensor, num_microbatches,
                  losses):
    """Run one chunk on one micro batch; on the last stage return the scaled loss."""
    unwrap_model(chunk).set_input_tensor(input_tensor)
    output_tensor, loss_func = forward_step_func(data_iterator, chunk)
    if ps.is_pipeline_last_stage():
        loss, loss_dict = loss_func(output_tensor)
        output_tensor = loss / num_microbatches
        losses.append(loss_dict)
    return output_tensor


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


def _backward_step(input_tensor, output_tensor, output_tensor_grad, grad_scale_func):
    """Backpropagate one micro batch through one chunk; return the input's grad."""
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


def _chunks(model):
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _no_grad_if(flag):
    return torch.no_grad() if flag else contextlib.nullcontext()


def forward_backward_pipelining_without_interleaving(
        forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size,
        forward_only=False, grad_scale_func=None, *, tensor_shape=None, dtype=None, trace=None):
    """1F1B schedule over one model chunk per rank; returns the last stage's loss dicts.

    ``tensor_shape`` / ``dtype`` override what is read from the model's config
    (stand-in models in tests and benchmarks have none); ``trace`` is an
    optional ``ScheduleTrace``.
    """
    chunks = _chunks(model)
    if len(chunks) != 1:
        raise ValueError(f"the non-interleaved pipeline schedule runs one model chunk per rank, "
                         f"got {len(chunks)}")
    chunk = chunks[0]
    if isinstance(data_iterator, (list, tuple)):
        data_iterator = data_iterator[0]
    spec = _tensor_spec(chunk, seq_length, micro_batch_size, tensor_shape, dtype)
    num_stages = ps.get_pipeline_model_parallel_world_size()
    stage = ps.get_pipeline_model_parallel_rank()
    m = int(num_microbatches)
    losses = []

    if forward_only:
        with torch.no_grad():
            for i in range(m):
                input_tensor = p2p.recv_forward(spec)
                output_tensor = _forward_step(forward_step_func, data_iterator, chunk,
                                              input_tensor, m, losses)
                if trace is not None:
                    trace._record("F", 0, i, 1)
                p2p.send_forward(output_tensor, spec)
        return losses

    num_warmup = min(num_stages - stage - 1, m)
    num_steady = m - num_warmup
    held = deque()  # (microbatch, input_tensor, output_tensor) awaiting backward
    next_forward = 0
    next_backward = 0

    def forward(input_tensor):
        nonlocal next_forward
        output_tensor = _forward_step(forward_step_func, data_iterator, chunk, input_tensor, m,
                                      losses)
        held.append((next_forward, input_tensor, output_tensor))
        if trace is not None:
            trace._record("F", 0, next_forward, len(held))
        next_forward += 1
        return output_tensor

    def backward(output_tensor_grad):
        nonlocal next_backward
        microbatch, input_tensor, output_tensor = held.popleft()
        input_tensor_grad = _backward_step(input_tensor, output_tensor, output_tensor_grad,
                                           grad_scale_func)
        if trace is not None:
            trace._record("B", 0, microbatch, len(held))
        next_backward += 1
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
        forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size,
        forward_only=False, grad_scale_func=None, *, tensor_shape=None, dtype=None, trace=None):
    """Interleaved 1F1B over ``v`` model chunks per rank; returns the last stage's loss dicts.

    ``model`` is the list of this rank's chunks (chunk ``c`` is global stage
    ``c * p + rank``); ``num_microbatches`` must be a multiple of the pipeline
    size. Keyword-only arguments as for the non-interleaved schedule.
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
    spec = _tensor_spec(chunks[0], seq_length, micro_batch_size, tensor_shape, dtype)
    total = m * v
    losses = []

    # Step k of the forward (or backward) sequence: micro batches go through
    # the chunks in groups of p; backward visits the chunks in reverse.
    def chunk_of(k, forward):
        c = (k % (p * v)) // p
        return c if forward else v - 1 - c

    def microbatch_of(k):
        return (k // (p * v)) * p + k % p

    if forward_only or m == p:
        num_warmup = total
    else:
        num_warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
    all_warmup = num_warmup == total
    num_steady = total - num_warmup

    inputs = [[] for _ in range(v)]
    outputs = [[] for _ in range(v)]
    output_grads = [[] for _ in range(v)]

    def in_flight():
        return sum(len(o) for o in outputs)

    def forward(k):
        c = chunk_of(k, True)
        ps.set_virtual_pipeline_model_parallel_rank(c)
        if ps.is_pipeline_first_stage() and len(inputs[c]) == len(outputs[c]):
            inputs[c].append(None)
        output_tensor = _forward_step(forward_step_func, iterators[c], chunks[c], inputs[c][-1],
                                      m, losses)
        outputs[c].append(output_tensor)
        if trace is not None:
            trace._record("F", c, microbatch_of(k), in_flight())
        if forward_only:
            inputs[c].pop()
            outputs[c].pop()
        return output_tensor

    def backward(k):
        c = chunk_of(k, False)
        ps.set_virtual_pipeline_model_parallel_rank(c)
        if ps.is_pipeline_last_stage() and not output_grads[c]:
            output_grads[c].append(None)
        input_tensor_grad = _backward_step(inputs[c].pop(0), outputs[c].pop(0),
                                           output_grads[c].pop(0), grad_scale_func)
        if trace is not None:
            trace._record("B", c, microbatch_of(k), in_flight())
        return input_tensor_grad

    saved_virtual_rank = ps.get_virtual_pipeline_model_parallel_rank()
    try:
        with _no_grad_if(forward_only):
            ps.set_virtual_pipeline_model_parallel_rank(0)
            inputs[0].append(p2p.recv_forward(spec))

            for k in range(num_warmup):
                output_tensor = forward(k)
                next_chunk = chunk_of(k + 1, True)
                # The first rank's chunk 0 reads data, it receives nothing.
                recv_prev = not (ps.is_pipeline_first_stage(ignore_virtual=True)
                                 and next_chunk == 0) and k != total - 1
                if ps.is_pipeline_last_stage():
                    output_tensor = None  # a loss: nothing to send on
                if k == num_warmup - 1 and not forward_only and not all_warmup:
                    # The steady state's first backward needs a gradient now.
                    recv_next = not ps.is_pipeline_last_stage(ignore_virtual=True)
                    input_tensor, output_tensor_grad = \
                        p2p.send_forward_backward_recv_forward_backward(
                            output_tensor, None, recv_prev, recv_next, spec)
                    output_grads[v - 1].append(output_tensor_grad)
                else:
                    input_tensor = p2p.send_forward_recv_forward(output_tensor, recv_prev, spec)
                _release_output(output_tensor)  # None (nothing sent) on the last stage
                inputs[next_chunk].append(input_tensor)

            for i in range(num_steady):
                k_fwd = num_warmup + i
                k_bwd = i
                output_tensor = forward(k_fwd)
                input_tensor_grad = backward(k_bwd)

                ps.set_virtual_pipeline_model_parallel_rank(chunk_of(k_fwd, True))
                if ps.is_pipeline_last_stage():
                    output_tensor = None
                ps.set_virtual_pipeline_model_parallel_rank(chunk_of(k_bwd, False))
                if ps.is_pipeline_first_stage():
                    input_tensor_grad = None

                # What arrives now on the first rank left the last rank p - 1
                # forward steps ago, for the chunk after that one's; the
                # first rank's chunk 0 receives nothing. Mirror image for
                # gradients on the last rank.
                if ps.is_pipeline_first_stage(ignore_virtual=True):
                    origin = chunk_of(k_fwd - (p - 1), True)
                    recv_prev = origin != v - 1
                    next_fwd_chunk = origin + 1
                else:
                    recv_prev = True
                    next_fwd_chunk = chunk_of(k_fwd + 1, True)
                if ps.is_pipeline_last_stage(ignore_virtual=True):
                    origin = chunk_of(k_bwd - (p - 1), False)
                    recv_next = origin != 0
                    next_bwd_chunk = origin - 1
                else:
                    recv_next = True
                    next_bwd_chunk = chunk_of(k_bwd + 1, False)
                if i == num_steady - 1:
                    recv_prev = False

                input_tensor, output_tensor_grad = \
                    p2p.send_forward_backward_recv_forward_backward(
                        output_tensor, input_tensor_grad, recv_prev, recv_next, spec)
                _release_output(output_tensor)
                if recv_prev:
                    inputs[next_fwd_chunk].append(input_tensor)
                if recv_next:
                    output_grads[next_bwd_chunk].append(output_tensor_grad)

            if not forward_only:
                if all_warmup:
                    ps.set_virtual_pipeline_model_parallel_rank(v - 1)
                    output_grads[v - 1].append(p2p.recv_backward(spec))
                for k in range(num_steady, total):
                    input_tensor_grad = backward(k)
                    next_bwd_chunk = chunk_of(k + 1, False)
                    recv_next = not (ps.is_pipeline_last_stage(ignore_virtual=True)
                                     and next_bwd_chunk == v - 1) and k != total - 1
                    output_grads[next_bwd_chunk].append(
                        p2p.send_backward_recv_backward(input_tensor_grad, recv_next, spec))
    finally:
        ps.set_virtual_pipeline_model_parallel_rank(saved_virtual_rank)
    return losses
