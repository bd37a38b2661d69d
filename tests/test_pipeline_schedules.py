"""The 1F1B and interleaved schedules on stand-in stages (one tanh-Linear per
global stage), four gloo processes.

Each run checks, on every rank: the order of forward / backward steps against
the schedule's pattern, the most micro batches held at once, the loss dicts and
the gradients against a single-process run of the same stages (loss divided
by the number of micro batches and scaled by grad_scale_func exactly once).
The parent then replays every rank's recorded order with dependencies between
stages (a forward needs the previous stage's forward, a backward the next
stage's backward) to prove the orders fit together without deadlock and
reach the theoretical time, m (f + b) + (p - 1)(f + b) / v.
"""
import pytest
import torch

from megatron import schedules as sched
from megatron.mpu import parallel_state as ps
from tests.dist_harness import run_distributed

S, B, H = 2, 3, 4
GRAD_SCALE = 4.0


class _Stage(torch.nn.Module):
    """One global pipeline stage: tanh(x W^T + b), initialized from its index."""

    def __init__(self, index):
        super().__init__()
        g = torch.Generator().manual_seed(1000 + index)
        self.weight = torch.nn.Parameter(torch.randn(H, H, generator=g, dtype=torch.float64) / 2)
        self.bias = torch.nn.Parameter(torch.randn(H, generator=g, dtype=torch.float64) / 4)
        self.input_tensor = None

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor

    def forward(self, x):
        inp = x if self.input_tensor is None else self.input_tensor
        # "* 1.0": a last op that does not save its output (tanh's backward would), as a
        # real stage's residual add, so releasing a sent output really frees it.
        return torch.tanh(inp @ self.weight.t() + self.bias) * 1.0


def _microbatch(i):
    g = torch.Generator().manual_seed(i)
    return {"x": torch.randn(S, B, H, generator=g, dtype=torch.float64),
            "y": torch.randn(S, B, H, generator=g, dtype=torch.float64)}


def _data(m):
    return iter([_microbatch(i) for i in range(m)])


def _make_forward_step(draw_always, sent_outputs=None):
    """A forward step that draws a batch on every chunk, or only where one is
    needed (first and last stage), as real forward steps do. Outputs that go on
    to a next stage are appended to ``sent_outputs``."""
    def forward_step(data_iterator, model):
        needs = ps.is_pipeline_first_stage() or ps.is_pipeline_last_stage()
        batch = next(data_iterator) if (draw_always or needs) else None
        output = model(batch["x"] if ps.is_pipeline_first_stage() else None)
        if sent_outputs is not None and not ps.is_pipeline_last_stage():
            sent_outputs.append(output)

        def loss_func(out):
            loss = ((out - batch["y"]) ** 2).mean()
            return loss, {"loss": loss.detach().clone()}
        return output, loss_func
    return forward_step


def _reference(num_stages, m):
    """Single process: every stage in order, the same loss scaling."""
    stages = [_Stage(i) for i in range(num_stages)]
    losses = []
    for i in range(m):
        batch = _microbatch(i)
        h = batch["x"]
        for st in stages:
            h = st(h)
        loss = ((h - batch["y"]) ** 2).mean()
        losses.append(loss.detach())
        (loss / m * GRAD_SCALE).backward()
    return stages, losses


def expected_1f1b(p, r, m):
    """Warm-up forwards, then one forward one backward, then cool-down backwards."""
    w = min(p - r - 1, m)
    steps = [("F", 0, i) for i in range(w)]
    for i in range(m - w):
        steps += [("F", 0, w + i), ("B", 0, i)]
    return steps + [("B", 0, i) for i in range(m - w, m)]


def expected_interleaved(p, r, m, v):
    """Megatron's interleaved order: micro batches in groups of p per chunk,
    backward over the chunks in reverse; warm-up 2(p - r - 1) + (v - 1)p."""
    total = m * v
    order = [((k % (p * v)) // p, (k // (p * v)) * p + k % p) for k in range(total)]
    fwd = [("F", c, mb) for c, mb in order]
    bwd = [("B", v - 1 - c, mb) for c, mb in order]
    w = total if m == p else min(2 * (p - r - 1) + (v - 1) * p, total)
    steps = fwd[:w]
    for i in range(total - w):
        steps += [fwd[w + i], bwd[i]]
    return steps + bwd[total - w:]


def _run(p, m, v, forward_only=False, draw_always=False):
    """Run one schedule here; check grads, losses, order; return what the parent replays."""
    r = ps.get_pipeline_model_parallel_rank()
    interleaved = v is not None
    ps.set_virtual_pipeline_model_parallel_world_size(v)
    ps.set_virtual_pipeline_model_parallel_rank(0 if interleaved else None)
    nv = v or 1
    chunks = [_Stage(c * p + r) for c in range(nv)]
    trace = sched.ScheduleTrace()
    fn = (sched.forward_backward_pipelining_with_interleaving if interleaved
          else sched.forward_backward_pipelining_without_interleaving)
    sent = []
    losses = fn(_make_forward_step(draw_always, sent), _data(m), chunks if interleaved else chunks[0],
                m, tensor_shape=(S, B, H), dtype=torch.float64, forward_only=forward_only,
                grad_scale_func=lambda loss: loss * GRAD_SCALE, trace=trace)
    ps.set_virtual_pipeline_model_parallel_world_size(None)
    ps.set_virtual_pipeline_model_parallel_rank(None)

    # Every output sent on had its storage released after sending (the gradients
    # checked below still flow through its graph).
    assert len(sent) == m * (nv if r < p - 1 else nv - 1), (len(sent), p, r, m, v)
    if not forward_only:
        assert all(t.numel() == 1 for t in sent), [tuple(t.shape) for t in sent]
    ref_stages, ref_losses = _reference(p * nv, m)
    if r == p - 1:
        assert len(losses) == m, (len(losses), m)
        for got, want in zip(losses, ref_losses):
            torch.testing.assert_close(got["loss"], want, rtol=1e-12, atol=0)
    else:
        assert losses == []
    for c, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            if forward_only:
                assert param.grad is None
            else:
                torch.testing.assert_close(param.grad, getattr(ref_stages[c * p + r], name).grad,
                                           rtol=1e-10, atol=1e-12)

    if forward_only:
        forwards = [s for s in expected_interleaved(p, r, m, nv) if s[0] == "F"]
        assert trace.steps == forwards, (p, r, m, v, trace.steps)
    elif interleaved:
        assert trace.steps == expected_interleaved(p, r, m, v), (p, r, m, v, trace.steps)
    else:
        assert trace.steps == expected_1f1b(p, r, m), (p, r, m, trace.steps)
        # the 1F1B memory bound: p - r micro batches on stage r, never more than p
        assert trace.max_in_flight == min(p - r, m) <= p, (p, r, m, trace.max_in_flight)
    if not forward_only:
        held = peak = 0
        for kind, _, _ in trace.steps:
            held += 1 if kind == "F" else -1
            peak = max(peak, held)
        assert trace.max_in_flight == peak and held == 0
    return {"rank": r, "steps": trace.steps, "max_in_flight": trace.max_in_flight}


CASES_PP4 = [(None, 1), (None, 3), (None, 4), (None, 7), (2, 4), (2, 8)]
CASES_PP2 = [(None, 5), (2, 2), (2, 4), (2, 6), (3, 4)]


def _schedules_worker():
    import torch.distributed as dist
    out = {}
    ps.initialize_model_parallel(1, 4)
    for v, m in CASES_PP4:
        out[(4, v, m)] = _run(4, m, v)
    _run(4, 3, None, forward_only=True)
    _run(4, 4, 2, forward_only=True)
    _run(4, 8, 2, draw_always=True)
    ps.destroy_model_parallel()

    ps.initialize_model_parallel(1, 2)  # two pipelines (DP = 2)
    for v, m in CASES_PP2:
        out[(2, v, m)] = _run(2, m, v)
    ps.set_virtual_pipeline_model_parallel_world_size(2)
    try:
        sched.forward_backward_pipelining_with_interleaving(
            _make_forward_step(False), _data(3), [_Stage(0), _Stage(2)], 3,
            tensor_shape=(S, B, H), dtype=torch.float64)
        raise AssertionError("m = 3 with p = 2 must be refused")
    except ValueError as e:
        assert "num_microbatches (3)" in str(e) and "(2)" in str(e), e
    ps.set_virtual_pipeline_model_parallel_world_size(None)
    dist.barrier()
    return out


def _replay(traces, p, v, cost_f, cost_b):
    """Run every rank's order against stage dependencies; return the makespan.

    Chunk c on rank r is global stage g = c * p + r. F(g, mb) waits for
    F(g - 1, mb); B(g, mb) waits for B(g + 1, mb) and, on the last stage,
    for F(g, mb). Fails if the orders deadlock.
    """
    n = p * v
    done = {}
    pos = [0] * p
    free = [0.0] * p
    progress = True
    while progress:
        progress = False
        for r in range(p):
            while pos[r] < len(traces[r]):
                kind, c, mb = traces[r][pos[r]]
                g = c * p + r
                if kind == "F":
                    deps = [("F", g - 1, mb)] if g > 0 else []
                else:
                    deps = [("B", g + 1, mb)] if g < n - 1 else [("F", g, mb)]
                if any(d not in done for d in deps):
                    break
                start = max([free[r]] + [done[d] for d in deps])
                free[r] = start + (cost_f if kind == "F" else cost_b)
                done[(kind, g, mb)] = free[r]
                pos[r] += 1
                progress = True
    assert all(pos[r] == len(traces[r]) for r in range(p)), f"deadlock at {pos}"
    return max(free)


def test_schedule_orders_gradients_and_memory():
    results = run_distributed(_schedules_worker, 4)
    keys = [(4, v, m) for v, m in CASES_PP4] + [(2, v, m) for v, m in CASES_PP2]
    for key in keys:
        p, v, m = key
        # ranks 0..3 are one pipeline at p = 4; ranks 0, 2 are one at p = 2
        ranks = range(4) if p == 4 else (0, 2)
        traces = [results[g][key]["steps"] for g in ranks]
        assert [results[g][key]["rank"] for g in ranks] == list(range(p))
        nv = v or 1
        # A chunk's forward costs 1/v, its backward 2/v: the ideal pipeline
        # takes m (f + b) plus a bubble of (p - 1)(f + b) / v.
        makespan = _replay(traces, p, nv, 1.0 / nv, 2.0 / nv)
        assert makespan == pytest.approx(3.0 * m + 3.0 * (p - 1) / nv), (key, makespan)
    # 1F1B holds at most p micro batches while m exceeds p (GPipe would hold m)
    assert results[0][(4, None, 7)]["max_in_flight"] == 4


def test_single_process_errors():
    """Wrong inputs are refused with the values involved, before any communication."""
    with pytest.raises(ValueError, match="one model chunk per rank, got 2"):
        sched.forward_backward_pipelining_without_interleaving(
            None, None, [_Stage(0), _Stage(1)], 2, tensor_shape=(S, B, H), dtype=torch.float64)
    with pytest.raises(ValueError, match="tensor_shape"):
        sched.forward_backward_pipelining_without_interleaving(
            None, None, [_Stage(0)], 2, tensor_shape=None, dtype=torch.float64)
    with pytest.raises(ValueError, match="2 model chunks but virtual_pipeline_model_parallel_size"
                                         " is None"):
        sched.forward_backward_pipelining_with_interleaving(
            None, None, [_Stage(0), _Stage(1)], 2, tensor_shape=(S, B, H), dtype=torch.float64)
