"""The interleaved 1F1B schedule as a plan: integers in, integers and flags out.

``interleaved_steps(p, v, rank, m)`` lists what one rank does: at each step
one forward and/or one backward, then one exchange with its neighbours that
sends their results and receives the input of a later forward (from the
previous rank) and/or the output grad of a later backward (from the next
rank). ``schedules.forward_backward_pipelining_with_interleaving`` executes
the list; nothing here touches tensors or ``torch.distributed``, so
``tests/test_schedule_plan.py`` can run every rank's plan against the others
in one process.

Numbering: a rank's forwards are ``k = 0 .. m v - 1``; micro batches go
through its ``v`` chunks in groups of ``p`` (``forward_chunk``,
``microbatch``), and its backwards visit the chunks in reverse
(``backward_chunk``). Chunk ``c`` on rank ``r`` is global stage ``c p + r``:
the last rank sends its activations on to the first rank's next chunk, and
the first rank its gradients back to the last rank's previous chunk.
"""
from typing import NamedTuple, Optional


class Step(NamedTuple):
    """One step of a rank: run forward ``forward`` and/or backward ``backward``
    (step numbers, or None), send their results on, then receive the input of
    chunk ``input_chunk`` from the previous rank and / or the output grad of
    chunk ``grad_chunk`` from the next rank (None: nothing to receive)."""
    forward: Optional[int]
    backward: Optional[int]
    input_chunk: Optional[int]
    grad_chunk: Optional[int]


def forward_chunk(k, p, v):
    """The chunk that runs forward step ``k``."""
    return (k % (p * v)) // p


def backward_chunk(k, p, v):
    """The chunk that runs backward step ``k`` (the chunks in reverse)."""
    return v - 1 - forward_chunk(k, p, v)


def microbatch(k, p, v):
    """The micro batch of forward (or backward) step ``k``."""
    return (k // (p * v)) * p + k % p


def num_warmup_forwards(p, v, rank, m, forward_only=False):
    """Forwards before the first backward: enough for the first backward's
    gradient to have come back; all of them when there is no steady state."""
    total = m * v
    if forward_only or m == p:
        return total
    return min(2 * (p - rank - 1) + (v - 1) * p, total)


def steady_state_receives(p, v, rank, k_fwd, k_bwd, last):
    """What arrives after steady-state forward ``k_fwd`` and backward ``k_bwd``:
    ``(input_chunk, grad_chunk)``, each None when nothing does; ``last``: the
    last steady step (no forward follows).

    A middle rank receives for its next forward and its next backward. On the
    first rank, what arrives left the last rank ``p - 1`` forward steps
    earlier, from the chunk that ran forward ``k_fwd - (p - 1)`` here, and
    feeds the chunk after that one (nothing when that was the last chunk: it
    produced a loss). The mirror image holds for gradients on the last rank.
    """
    if rank == 0:
        origin = forward_chunk(k_fwd - (p - 1), p, v)
        input_chunk = origin + 1 if origin != v - 1 else None
    else:
        input_chunk = forward_chunk(k_fwd + 1, p, v)
    if last:
        input_chunk = None
    if rank == p - 1:
        origin = backward_chunk(k_bwd - (p - 1), p, v)
        grad_chunk = origin - 1 if origin != 0 else None
    else:
        grad_chunk = backward_chunk(k_bwd + 1, p, v)
    return input_chunk, grad_chunk


def interleaved_steps(p, v, rank, m, forward_only=False):
    """Every step of ``rank`` (of ``p``, ``v`` chunks each) for ``m`` micro
    batches: warm-up forwards, steady one-forward-one-backward, cool-down
    backwards, as a list of ``Step``."""
    total = m * v
    warmup = num_warmup_forwards(p, v, rank, m, forward_only)
    steps = []
    if rank != 0:
        steps.append(Step(None, None, 0, None))  # the first forward's input
    for k in range(warmup):
        nxt = forward_chunk(k + 1, p, v)
        # The first rank's chunk 0 reads data, it receives nothing.
        input_chunk = None if k == total - 1 or (rank == 0 and nxt == 0) else nxt
        # The steady state's first backward needs its gradient by then.
        first_grad = k == warmup - 1 and warmup < total and rank != p - 1
        steps.append(Step(k, None, input_chunk, v - 1 if first_grad else None))
    num_steady = total - warmup
    for i in range(num_steady):
        steps.append(Step(warmup + i, i, *steady_state_receives(p, v, rank, warmup + i, i,
                                                                i == num_steady - 1)))
    if forward_only:
        return steps
    if num_steady == 0 and rank != p - 1:
        steps.append(Step(None, None, None, v - 1))  # the first backward's gradient
    for k in range(num_steady, total):
        nxt = backward_chunk(k + 1, p, v)
        # The last rank's last chunk starts from the loss, it receives nothing.
        grad_chunk = None if k == total - 1 or (rank == p - 1 and nxt == v - 1) else nxt
        steps.append(Step(None, k, None, grad_chunk))
    return steps
