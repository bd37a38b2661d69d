"""Pipeline send/recv on gloo: values, shapes and dtypes arrive intact in both
directions, on a line of stages, around the interleaved ring, and with two
stages (where next == prev and both directions are in flight at once)."""
import pytest
import torch

from megatron.mpu import p2p_communication as p2p
from megatron.mpu import parallel_state as ps
from tests.dist_harness import run_distributed

SHAPE = (3, 2, 4)


def _payload(src, dst, kind, dtype):
    """A tensor whose every element names its sender, receiver (stages of this
    pipeline, named by global rank so pipelines cannot mix) and direction."""
    ranks = ps.get_pipeline_model_parallel_global_ranks()
    src, dst = ranks[src % len(ranks)], ranks[dst % len(ranks)]
    base = 100 * src + 10 * dst + (1 if kind == "fwd" else 2)
    values = torch.arange(24, dtype=torch.float32).reshape(SHAPE) / 8 + base
    return values.to(dtype)


def _check(tensor, src, dst, kind, dtype, what):
    expected = _payload(src, dst, kind, dtype)
    assert tensor is not None, what
    assert tensor.dtype == dtype and tuple(tensor.shape) == SHAPE, (what, tensor.dtype, tensor.shape)
    assert torch.equal(tensor, expected), (what, tensor.flatten()[:3], expected.flatten()[:3])


def _line_checks(dtype):
    """1F1B-style calls on a line of p stages (no wrap-around)."""
    p, r = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    spec = p2p.TensorSpec(SHAPE, dtype, torch.device("cpu"))
    first, last = r == 0, r == p - 1

    # forward chain: receive from r-1, then send to r+1
    got = p2p.recv_forward(spec)
    if first:
        assert got is None
    else:
        _check(got, r - 1, r, "fwd", dtype, "recv_forward")
        assert got.requires_grad, "a received activation must require grad"
    p2p.send_forward(_payload(r, r + 1, "fwd", dtype), spec)

    # backward chain: receive from r+1, then send to r-1
    got = p2p.recv_backward(spec)
    if last:
        assert got is None
    else:
        _check(got, r + 1, r, "bwd", dtype, "recv_backward")
    p2p.send_backward(_payload(r, r - 1, "bwd", dtype), spec)

    # steady-state pairs: even stages send forward and wait for a gradient,
    # odd stages send a gradient and wait for an activation; every exchange
    # then has one side in each call.
    if r % 2 == 0:
        got = p2p.send_forward_recv_backward(_payload(r, r + 1, "fwd", dtype), spec)
        if last:
            assert got is None
        else:
            _check(got, r + 1, r, "bwd", dtype, "send_forward_recv_backward")
    else:
        got = p2p.send_backward_recv_forward(_payload(r, r - 1, "bwd", dtype), spec)
        _check(got, r - 1, r, "fwd", dtype, "send_backward_recv_forward")


def _ring_checks(dtype):
    """Interleaved-style calls: the last stage hands on to the first."""
    p, r = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    spec = p2p.TensorSpec(SHAPE, dtype, torch.device("cpu"))
    nxt, prv = (r + 1) % p, (r - 1) % p

    got = p2p.send_forward_recv_forward(_payload(r, nxt, "fwd", dtype), True, spec)
    _check(got, prv, r, "fwd", dtype, "send_forward_recv_forward")
    got = p2p.send_backward_recv_backward(_payload(r, prv, "bwd", dtype), True, spec)
    _check(got, nxt, r, "bwd", dtype, "send_backward_recv_backward")
    # both directions at once (with p == 2, to and from the same peer)
    fwd, bwd = p2p.send_forward_backward_recv_forward_backward(
        _payload(r, nxt, "fwd", dtype), _payload(r, prv, "bwd", dtype), True, True, spec)
    _check(fwd, prv, r, "fwd", dtype, "both directions: activation")
    _check(bwd, nxt, r, "bwd", dtype, "both directions: gradient")
    # flags off: nothing received, nothing sent
    assert p2p.send_forward_backward_recv_forward_backward(None, None, False, False, spec) \
        == (None, None)


def _p2p_worker():
    import torch.distributed as dist
    done = []
    for tp, pp in [(1, 4), (1, 2), (2, 2)]:
        ps.initialize_model_parallel(tp, pp)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            _line_checks(dtype)
            _ring_checks(dtype)
        # sequence parallelism sends the s / TP slice
        shape = p2p.pipeline_tensor_shape(16, 2, 8, sequence_parallel=True)
        assert shape == (16 // tp, 2, 8), shape
        assert p2p.pipeline_tensor_shape(16, 2, 8) == (16, 2, 8)
        done.append((tp, pp, ps.get_pipeline_model_parallel_rank()))
        dist.barrier()
        ps.destroy_model_parallel()
    return done


def test_p2p_round_trips_on_gloo():
    results = run_distributed(_p2p_worker, 4)
    # every layout ran on every rank; stage numbers are the PP ranks expected
    assert [[s for (_, _, s) in r] for r in results] == [[0, 0, 0], [1, 0, 0], [2, 1, 1], [3, 1, 1]]


def test_shape_errors_are_clear():
    spec = p2p.TensorSpec(SHAPE, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"\(3, 2, 5\).*\(3, 2, 4\)"):
        p2p._check_shape(torch.zeros(3, 2, 5), spec, "send")
    with pytest.raises(ValueError, match="seq_length \\(15\\).*\\(2\\)"):
        _sequence_parallel_shape_with_tp(2, 15)


def _sequence_parallel_shape_with_tp(tp, seq):
    # Without process groups TP is 1, so fake the world size for this check.
    saved = ps._TENSOR_MODEL_PARALLEL_GLOBAL_RANKS
    ps._TENSOR_MODEL_PARALLEL_GLOBAL_RANKS = list(range(tp))
    try:
        return p2p.pipeline_tensor_shape(seq, 1, 8, sequence_parallel=True)
    finally:
        ps._TENSOR_MODEL_PARALLEL_GLOBAL_RANKS = saved
