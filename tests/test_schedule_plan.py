"""The interleaved schedule's plan (``megatron/schedule_plan.py``), checked by
running every rank's plan against the others in one process.

The simulation knows only the pipeline's wiring: chunk ``c`` of rank ``r`` is
global stage ``g = c p + r``; a forward on a stage ``g < p v - 1`` sends its
activation to the next rank, a backward on a stage ``g > 0`` sends its input
grad to the previous rank, and each pair of ranks delivers messages of one kind
in the order they were sent. Each step's exchange waits until every one of its
sends has been received and every one of its receives has been sent (the
strictest reading of ``batch_isend_irecv``). The plan must then, for several
(p, v, m): finish without deadlock, file every arrival under the chunk that
message is for, give every forward exactly one waiting input (the schedule
takes the latest) and every backward the gradient of its own micro batch, and
leave nothing unreceived.
"""
import pytest

from megatron import schedule_plan
from megatron.schedule_plan import backward_chunk, forward_chunk, interleaved_steps, microbatch

CASES = [(p, v, m) for p in (2, 3, 4, 5) for v in (2, 3, 4) for m in (p, 2 * p, 3 * p)]


def simulate(p, v, m, plans, forward_only=False):
    """Run ``plans[r]`` (a list of ``Step``) on every rank ``r``; assert on any failure."""
    n = p * v
    channels = {}  # (src, dst, kind) -> {"sent": [labels], "received": count}

    def channel(src, dst, kind):
        return channels.setdefault((src, dst, kind), {"sent": [], "received": 0})

    pos = [0] * p  # the step each rank is at
    posted = [None] * p  # that step's exchange: [(op, channel key, index, chunk)]
    inputs = [[[] for _ in range(v)] for _ in range(p)]  # arrived, not yet used
    grads = [[[] for _ in range(v)] for _ in range(p)]
    forwarded = [set() for _ in range(p)]
    backwarded = [set() for _ in range(p)]

    def compute_and_post(r):
        """Run step pos[r]'s forward / backward and post its exchange."""
        step = plans[r][pos[r]]
        ops = []
        if step.forward is not None:
            c, mb = forward_chunk(step.forward, p, v), microbatch(step.forward, p, v)
            g = c * p + r
            if g > 0:
                waiting = inputs[r][c]
                assert len(waiting) == 1, f"rank {r} forward {step.forward} (chunk {c}, " \
                    f"micro batch {mb}) finds {len(waiting)} inputs waiting: {waiting}"
                assert waiting.pop() == ("act", g - 1, mb), (r, step)
            forwarded[r].add((c, mb))
            if g < n - 1:
                ops.append(("send", (r, (r + 1) % p, "act"), ("act", g, mb), None))
        if step.backward is not None:
            c, mb = backward_chunk(step.backward, p, v), microbatch(step.backward, p, v)
            g = c * p + r
            assert (c, mb) in forwarded[r], f"rank {r} backward before forward of {(c, mb)}"
            if g < n - 1:
                assert grads[r][c], f"rank {r} backward {step.backward} (chunk {c}, micro " \
                    f"batch {mb}) has no gradient"
                assert grads[r][c].pop(0) == ("grad", g + 1, mb), (r, step)
            backwarded[r].add((c, mb))
            if g > 0:
                ops.append(("send", (r, (r - 1) % p, "grad"), ("grad", g, mb), None))
        if step.input_chunk is not None:
            ops.append(("recv", ((r - 1) % p, r, "act"), None, step.input_chunk))
        if step.grad_chunk is not None:
            ops.append(("recv", ((r + 1) % p, r, "grad"), None, step.grad_chunk))
        posted[r] = []
        for op, key, label, chunk in ops:
            ch = channel(*key)
            if op == "send":
                posted[r].append((op, key, len(ch["sent"]), chunk))
                ch["sent"].append(label)
            else:
                posted[r].append((op, key, ch["received"], chunk))
                ch["received"] += 1

    def try_complete(r):
        """Finish rank r's exchange if every op has its partner; True if it did."""
        for op, key, index, _ in posted[r]:
            ch = channel(*key)
            if (op == "send" and ch["received"] <= index) or \
                    (op == "recv" and len(ch["sent"]) <= index):
                return False
        for op, key, index, chunk in posted[r]:
            if op != "recv":
                continue
            label = channel(*key)["sent"][index]
            kind, g, mb = label
            stage = chunk * p + r
            if kind == "act":
                assert g + 1 == stage, f"rank {r} files {label} as the input of chunk {chunk}"
                inputs[r][chunk].append(label)
            else:
                assert g - 1 == stage, f"rank {r} files {label} as the grad of chunk {chunk}"
                grads[r][chunk].append(label)
        pos[r] += 1
        posted[r] = None
        return True

    progress = True
    while progress:
        progress = False
        for r in range(p):
            while pos[r] < len(plans[r]):
                if posted[r] is None:
                    compute_and_post(r)
                    progress = True
                if not try_complete(r):
                    break
                progress = True
    assert pos == [len(plan) for plan in plans], f"deadlock: steps {pos} of " \
        f"{[len(plan) for plan in plans]}"
    everything = {(c, mb) for c in range(v) for mb in range(m)}
    for r in range(p):
        assert forwarded[r] == everything
        assert backwarded[r] == (set() if forward_only else everything)
        assert not any(inputs[r]) and not any(grads[r]), (r, inputs[r], grads[r])
    for key, ch in channels.items():
        assert ch["received"] == len(ch["sent"]), f"{key}: {len(ch['sent'])} sent, " \
            f"{ch['received']} received"


def _plans(p, v, m, forward_only=False):
    return [interleaved_steps(p, v, r, m, forward_only) for r in range(p)]


@pytest.mark.parametrize("forward_only", [False, True])
def test_plan_runs_the_pipeline(forward_only):
    for p, v, m in CASES:
        simulate(p, v, m, _plans(p, v, m, forward_only), forward_only)


def test_steady_state_receives_on_the_end_ranks():
    """The first rank's input and the last rank's gradient arrive p - 1 steps
    after they left the other end; middle ranks receive for their next step."""
    p, v = 4, 2
    # First rank, forward step 12 (chunk 1): what arrives left rank 3 when it
    # ran forward 9 = 12 - 3 (chunk 0), so it is chunk 1's input. Forward 15
    # - 3 = 12 was chunk 1 on rank 3, the last stage: nothing arrives.
    assert schedule_plan.steady_state_receives(p, v, 0, 12, 0, False)[0] == 1
    assert schedule_plan.steady_state_receives(p, v, 0, 15, 0, False)[0] is None
    # Last rank, backward step 4 (chunk 0): 4 - 3 = 1 was chunk 1 on rank 0, so
    # the gradient is for chunk 0; backward 7 - 3 = 4 was chunk 0 on rank 0,
    # the first stage: nothing arrives.
    assert schedule_plan.steady_state_receives(p, v, 3, 0, 4, False)[1] == 0
    assert schedule_plan.steady_state_receives(p, v, 3, 0, 7, False)[1] is None
    # A middle rank: forward 3 (chunk 0) is followed by 4 (chunk 1), backward 3
    # (chunk 1) by 4 (chunk 0); on the last steady step no input arrives.
    assert schedule_plan.steady_state_receives(p, v, 1, 3, 3, False) == (1, 0)
    assert schedule_plan.steady_state_receives(p, v, 1, 3, 3, True) == (None, 0)


def test_simulation_catches_a_wrong_plan(monkeypatch):
    """The check can fail: plans with one receive rule broken are refused."""
    p, v, m = 4, 2, 8
    right = schedule_plan.steady_state_receives

    def middle_rule_everywhere(p_, v_, rank, k_fwd, k_bwd, last):
        # The first rank treated like a middle one: its input files under the wrong chunk.
        return right(p_, v_, 1 if rank == 0 else rank, k_fwd, k_bwd, last)

    monkeypatch.setattr(schedule_plan, "steady_state_receives", middle_rule_everywhere)
    with pytest.raises(AssertionError):
        simulate(p, v, m, _plans(p, v, m))
    monkeypatch.undo()

    plans = _plans(p, v, m)
    # Drop the receive of the first backward's gradient at the end of rank 0's warm-up.
    k = next(i for i, s in enumerate(plans[0]) if s.grad_chunk is not None)
    plans[0][k] = plans[0][k]._replace(grad_chunk=None)
    with pytest.raises(AssertionError):
        simulate(p, v, m, plans)
