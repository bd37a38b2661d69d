"""Point-to-point communication between adjacent pipeline stages.

Activations travel forward (stage i -> i+1) and their gradients backward
(stage i+1 -> i) with batched ``torch.distributed.batch_isend_irecv``. The
receiver allocates its buffer from a ``TensorSpec`` known in advance (the
hidden states of one micro batch, ``[s, b, h]`` or ``[s/TP, b, h]`` with
sequence parallelism), so no shape travels with the data.

The first group of functions (``recv_forward``, ``send_forward``, ...) know the
pipeline ends: on the first stage nothing is received from before, on the last
nothing is sent on. The flag-driven group (``send_forward_recv_forward`` ...)
leaves those decisions to the interleaved schedule, where the last physical
stage does hand its activations on to the first one (next model chunk).

Every call waits until its transfers are complete, so a returned tensor is
ready to use and a sent tensor may be reused.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import parallel_state as ps

# With two stages a rank's next and previous stage are the same process, and
# both directions may be in flight at once. Gloo matches messages by tag, so a
# distinct tag per direction keeps an activation from landing in a gradient's
# buffer; NCCL ignores tags but matches in issue order, which ``_communicate``
# keeps identical on both sides (forward-flowing ops first).
_TAG_FORWARD = 1
_TAG_BACKWARD = 2


@dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and device of the tensors exchanged between stages."""
    shape: tuple
    dtype: torch.dtype
    device: torch.device


def pipeline_tensor_shape(seq_length, micro_batch_size, hidden_size, sequence_parallel=False):
    """Shape of one micro batch's hidden states on the wire: ``(s, b, h)``.

    With sequence parallelism each tensor-parallel rank holds (and sends) only
    its ``s / TP`` slice of the sequence.
    """
    seq = int(seq_length)
    if sequence_parallel:
        tp = ps.get_tensor_model_parallel_world_size()
        if seq % tp != 0:
            raise ValueError(f"seq_length ({seq}) must be divisible by "
                             f"tensor_model_parallel_size ({tp}) with sequence parallelism")
        seq //= tp
    return (seq, int(micro_batch_size), int(hidden_size))


def _check_shape(tensor, spec, what):
    if tensor is not None and spec is not None and tuple(tensor.shape) != tuple(spec.shape):
        raise ValueError(f"pipeline {what}: tensor of shape {tuple(tensor.shape)} does not match "
                         f"the agreed shape {tuple(spec.shape)} (seq_length, micro_batch_size, "
                         f"hidden_size)")


def _communicate(*, tensor_send_next, tensor_send_prev, recv_prev, recv_next, spec):
    """Exchange tensors with the previous and next stage in one batch.

    Returns ``(from_prev, from_next)``; each is None unless asked for. A tensor
    received from the previous stage is an activation, so it requires grad.
    """
    if (recv_prev or recv_next) and spec is None:
        raise ValueError("receiving a pipeline tensor needs its TensorSpec")
    _check_shape(tensor_send_next, spec, "send to the next stage")
    _check_shape(tensor_send_prev, spec, "send to the previous stage")
    group = ps.get_pipeline_model_parallel_group()
    next_rank = ps.get_pipeline_model_parallel_next_rank()
    prev_rank = ps.get_pipeline_model_parallel_prev_rank()

    from_prev = from_next = None
    if recv_prev:
        from_prev = torch.empty(spec.shape, dtype=spec.dtype, device=spec.device,
                                requires_grad=True)
    if recv_next:
        from_next = torch.empty(spec.shape, dtype=spec.dtype, device=spec.device)

    # The same order on every rank: traffic flowing forward, then traffic
    # flowing backward. Between any pair of ranks the sends of one side then
    # meet the receives of the other in the same order, even when next == prev.
    ops = []
    if tensor_send_next is not None:
        ops.append(dist.P2POp(dist.isend, tensor_send_next.detach().contiguous(), next_rank,
                              group, _TAG_FORWARD))
    if from_prev is not None:
        ops.append(dist.P2POp(dist.irecv, from_prev, prev_rank, group, _TAG_FORWARD))
    if tensor_send_prev is not None:
        ops.append(dist.P2POp(dist.isend, tensor_send_prev.detach().contiguous(), prev_rank,
                              group, _TAG_BACKWARD))
    if from_next is not None:
        ops.append(dist.P2POp(dist.irecv, from_next, next_rank, group, _TAG_BACKWARD))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        device = ops[0].tensor.device
        if device.type == "cuda":
            # wait() only orders the communication stream against the current
            # one; a later kernel on another stream must also see the data.
            torch.cuda.synchronize(device)
    return from_prev, from_next


# ---- stage-aware helpers (1F1B) ---------------------------------------------

def recv_forward(spec):
    """Receive this micro batch's input activations (None on the first stage)."""
    if ps.is_pipeline_first_stage():
        return None
    return _communicate(tensor_send_next=None, tensor_send_prev=None, recv_prev=True,
                        recv_next=False, spec=spec)[0]


def recv_backward(spec):
    """Receive the gradient of this stage's output (None on the last stage)."""
    if ps.is_pipeline_last_stage():
        return None
    return _communicate(tensor_send_next=None, tensor_send_prev=None, recv_prev=False,
                        recv_next=True, spec=spec)[1]


def send_forward(output_tensor, spec=None):
    """Send this stage's output activations on (nothing on the last stage)."""
    if ps.is_pipeline_last_stage():
        return
    _communicate(tensor_send_next=output_tensor, tensor_send_prev=None, recv_prev=False,
                 recv_next=False, spec=spec)


def send_backward(input_tensor_grad, spec=None):
    """Send the gradient of this stage's input back (nothing on the first stage)."""
    if ps.is_pipeline_first_stage():
        return
    _communicate(tensor_send_next=None, tensor_send_prev=input_tensor_grad, recv_prev=False,
                 recv_next=False, spec=spec)


def send_forward_recv_backward(output_tensor, spec):
    """Send the output on and receive its gradient in one batch (None on the last stage)."""
    if ps.is_pipeline_last_stage():
        return None
    return _communicate(tensor_send_next=output_tensor, tensor_send_prev=None, recv_prev=False,
                        recv_next=True, spec=spec)[1]


def send_backward_recv_forward(input_tensor_grad, spec):
    """Send an input gradient back and receive the next input in one batch
    (None on the first stage)."""
    if ps.is_pipeline_first_stage():
        return None
    return _communicate(tensor_send_next=None, tensor_send_prev=input_tensor_grad,
                        recv_prev=True, recv_next=False, spec=spec)[0]


# ---- flag-driven helpers (interleaved) ----------------------------------------

def send_forward_recv_forward(output_tensor, recv_prev, spec):
    """Send ``output_tensor`` (if not None) to the next rank and, if
    ``recv_prev``, receive activations from the previous rank."""
    return _communicate(tensor_send_next=output_tensor, tensor_send_prev=None,
                        recv_prev=recv_prev, recv_next=False, spec=spec)[0]


def send_backward_recv_backward(input_tensor_grad, recv_next, spec):
    """Send ``input_tensor_grad`` (if not None) to the previous rank and, if
    ``recv_next``, receive a gradient from the next rank."""
    return _communicate(tensor_send_next=None, tensor_send_prev=input_tensor_grad,
                        recv_prev=False, recv_next=recv_next, spec=spec)[1]


def send_forward_backward_recv_forward_backward(output_tensor, input_tensor_grad, recv_prev,
                                                recv_next, spec):
    """Both directions at once; returns ``(input_tensor, output_tensor_grad)``."""
    return _communicate(tensor_send_next=output_tensor, tensor_send_prev=input_tensor_grad,
                        recv_prev=recv_prev, recv_next=recv_next, spec=spec)
