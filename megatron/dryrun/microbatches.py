"""Which micro batches the dry run simulates, and how its counts extend to all of them.

A step of ``m`` micro batches repeats one pattern. After a prologue (the pipeline's
warm-up, the first backward of every model chunk) its steady state is periodic: with no
pipelining or 1F1B one period is one forward and one backward (one micro batch); with the
interleaved schedule it is ``p v`` steps (``p`` micro batches through each of the ``v``
chunks). An epilogue follows (the last steady step, the cool-down). What a rank holds at
any moment depends only on where the step is in that pattern (how many micro batches each
chunk holds, which op runs), so a step of ``k`` micro batches with the same prologue, at
least one full period and the same epilogue passes through every state of the full step:
its peak is the full step's, exactly. What a period adds (FLOPs, the per-micro-batch
collectives of TP, SP and PP, host reads) is measured over one period of the simulated
step and added once for each of the ``(m - k) / P`` periods it left out; what a step does
once (the DP gradient sync, the embedding sync, the optimizer, the step's scalars) runs
outside the schedule and is counted once.

One thing held grows with ``m``: the loss dict the last stage keeps per micro batch until
the step ends. The dry run makes the missing ones (same shapes, no data) where the left-out
periods would have made them, at the start of the measured period, so the simulated step
from there on holds what the full step holds in its last periods.
"""
from dataclasses import dataclass

import torch

from megatron.schedules import ScheduleTrace


@dataclass(frozen=True)
class Sample:
    """Simulate ``simulated`` of ``total`` micro batches. The counts between the records of
    forward steps ``start`` and ``end`` (this rank's forwards, numbered from 0) are one
    period of ``per_period`` micro batches, which the full step repeats
    ``skipped_periods`` more times."""
    total: int
    simulated: int
    start: int
    end: int
    per_period: int

    @property
    def skipped_periods(self):
        """Periods of the full step the simulated one leaves out."""
        return (self.total - self.simulated) // self.per_period


def plan_sample(p, v, rank, m):
    """The ``Sample`` for pipeline rank ``rank`` of ``p`` (``v`` chunks each) running ``m``
    micro batches, or None when every micro batch must run (``m`` is small already).

    No pipelining and 1F1B (``v`` = 1): ``w = p - rank - 1`` warm-up forwards; steady
    iteration 0 holds the first backward, iteration 1 (the second micro batch's backward,
    the next forward) is the measured period, iteration 2 is the last: ``k = w + 3``.
    Interleaved: ``k`` a multiple of ``p`` (as ``m`` is) whose steady state, after the
    ``w`` warm-up forwards (``schedule_plan.num_warmup_forwards``) and the steps in which
    each chunk runs its first backward, still holds one period of ``p v`` steps before its
    last step.
    """
    if v == 1:
        w = p - rank - 1
        start, per_period, forwards = w + 1, 1, 1
        k = w + 3
    else:
        if m % p != 0 or m <= p:
            return None  # the schedule refuses it, or has no steady state
        w = 2 * (p - rank - 1) + (v - 1) * p  # the warm-up of any k > p
        first = (v - 1) * p + 1  # steady steps 0 .. (v-1)p: chunk 0's first backward
        start, per_period, forwards = w + first, p, p * v
        # k v - w steady steps must cover first + one period + the last step.
        k = p * max(2, -(-(start + forwards + 1) // (p * v)))
    if k >= m:
        return None
    return Sample(m, k, start, start + forwards, per_period)


class ForwardTrace(ScheduleTrace):
    """A ``ScheduleTrace`` that calls ``on_forward(i)`` after this rank's forward step
    ``i`` is recorded (numbered from 0 in the order the schedule runs them)."""

    def __init__(self, on_forward):
        super().__init__()
        self.on_forward = on_forward
        self.forwards = 0

    def _record(self, kind, chunk, microbatch, in_flight):
        super()._record(kind, chunk, microbatch, in_flight)
        if kind == "F":
            self.forwards += 1
            self.on_forward(self.forwards - 1)


def sampled(forward_backward, sample, counters, periods):
    """``forward_backward`` (a schedule) run on ``sample.simulated`` micro batches.

    ``counters()`` returns the counts so far; their values at the start and the end of
    the measured period go to ``periods["start"]`` / ``periods["end"]``. At the start, the
    loss dicts of the left-out micro batches are made (empty tensors shaped as the last
    one's) and returned with the simulated ones, so the step holds and averages ``total``.
    """
    def run(forward_step_func, data_iterator, model, num_microbatches, *, trace, **kwargs):
        if num_microbatches != sample.total:
            raise ValueError(f"sampled {sample.total} micro batches, "
                             f"the schedule was asked for {num_microbatches}")
        last = []  # the newest loss dict (one reference, no copy)
        missing = []

        def forward_step(data, chunk):
            output, loss_func = forward_step_func(data, chunk)

            def capture(output_tensor):
                loss, loss_dict = loss_func(output_tensor)
                last[:] = [loss_dict]
                return loss, loss_dict
            return output, capture

        def on_forward(i):
            if i == sample.start:
                periods["start"] = counters()
                if last:  # the last stage: one loss dict per micro batch
                    missing.extend(_like(last[0]) for _ in range(sample.total - sample.simulated))
            elif i == sample.end:
                periods["end"] = counters()

        inner = ForwardTrace(on_forward)
        losses = forward_backward(forward_step, data_iterator, model, sample.simulated,
                                  trace=inner, **kwargs)
        trace.steps += inner.steps
        trace.max_in_flight = max(trace.max_in_flight, inner.max_in_flight)
        if "end" not in periods:
            raise RuntimeError(f"the schedule ran {inner.forwards} forwards, the sample "
                               f"measures forwards {sample.start} to {sample.end}")
        return losses + missing
    return run


def _like(loss_dict):
    """A loss dict of the same keys with each tensor replaced by an empty one like it."""
    return {k: torch.empty_like(v) if isinstance(v, torch.Tensor) else v
            for k, v in loss_dict.items()}


def extend(total, start, end, times):
    """``total`` plus ``times`` x (``end`` - ``start``), key by key through nested dicts
    of numbers (a key missing from ``start`` or ``end`` counts zero there)."""
    if isinstance(total, dict):
        return {k: extend(total[k], start.get(k, {} if isinstance(total[k], dict) else 0),
                          end.get(k, {} if isinstance(total[k], dict) else 0), times)
                for k in total}
    return total + times * (end - start)
