"""Vocab-parallel cross entropy equals the serial loss and gradient.

The distributed checks run in the 4-process launch shared with
test_mpu_layers (TP=4, then TP=2 x DP=2): padded and exact
vocabularies, targets on partition edges, bf16 logits, the tied output layer
(the transpose of the vocab-parallel embedding), and that only small
per-token tensors are communicated (the logits are never gathered).
"""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron import mpu
from tests.test_mpu_layers import tp_launch_results

ATOL = 1e-6
B, S, H = 3, 8, 16


def _randn(seed, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _err(actual, expected):
    if actual is None or expected is None or actual.shape != expected.shape:
        return float("inf")
    return (actual.detach().float() - expected.detach().float()).abs().max().item()


def _targets(vocab, padded_vocab, tp, seed):
    """Targets below ``vocab`` (padded rows never targeted), starting with every
    partition edge, then random ids."""
    per = padded_vocab // tp
    edges = [i * per + d for i in range(tp) for d in (-1, 0) if 0 <= i * per + d < vocab]
    fill = torch.randint(0, vocab, (B * S,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor(edges + [vocab - 1]), fill])[: B * S].view(B, S), edges


def _loss_checks(errs, tp, rank, vocab, padded_vocab, dtype, tag):
    target, edges = _targets(vocab, padded_vocab, tp, seed=1)
    logits_full = _randn(2, B, S, padded_vocab, scale=2.0).to(dtype)
    grad_loss = _randn(3, B, S, scale=0.5)

    logits = logits_full.chunk(tp, -1)[rank].clone().requires_grad_()
    loss = mpu.vocab_parallel_cross_entropy(logits, target)
    (loss * grad_loss).sum().backward()

    ref_logits = logits_full.float().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.view(-1, padded_vocab), target.view(-1), reduction="none").view(B, S)
    (ref * grad_loss).sum().backward()

    errs[f"{tag}/loss_fp32"] = 0.0 if loss.dtype == torch.float32 else float("inf")
    errs[f"{tag}/grad_dtype"] = 0.0 if logits.grad.dtype == dtype else float("inf")
    errs[f"{tag}/loss"] = _err(loss, ref)
    tol = ATOL if dtype == torch.float32 else 1e-2  # bf16 rounding of the returned grad
    expected_grad = ref_logits.grad.chunk(tp, -1)[rank].to(dtype)
    errs[f"{tag}/logits_grad"] = (_err(logits.grad, expected_grad), tol)
    errs[f"{tag}/edges_covered"] = 0.0 if all((target == e).any() for e in edges) else float("inf")


def _tied_output_checks(errs, tp, rank, tag):
    """Embedding lookup and the output layer share the vocab-parallel weight."""
    vocab, padded = 50, 52
    target, _ = _targets(vocab, padded, tp, seed=4)
    ids, _ = _targets(vocab, padded, tp, seed=5)
    w_full = _randn(6, padded, H, scale=0.3)

    def init(t):
        t.copy_(w_full)

    emb = mpu.VocabParallelEmbedding(padded, H, init_method=init)
    h = emb(ids)
    logits = F.linear(mpu.copy_to_tensor_model_parallel_region(h), emb.weight)
    loss = mpu.vocab_parallel_cross_entropy(logits, target)
    loss.mean().backward()

    wr = w_full.clone().requires_grad_()
    hr = F.embedding(ids, wr)
    ref = F.cross_entropy(F.linear(hr, wr).view(-1, padded), target.view(-1), reduction="none")
    ref.mean().backward()
    errs[f"{tag}/loss"] = _err(loss, ref.view(B, S))
    errs[f"{tag}/weight_grad"] = _err(emb.weight.grad, wr.grad.chunk(tp, 0)[rank])


def _communication_checks(errs, tp, rank, tag):
    """Only per-token tensors cross the wire; nothing of vocabulary size."""
    seen = []
    originals = {name: getattr(dist, name) for name in
                 ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single",
                  "reduce_scatter_tensor", "reduce_scatter_single", "broadcast")
                 if hasattr(dist, name)}

    def recorder(name, fn):
        def wrapped(tensor, *args, **kwargs):
            seen.append((name, tensor.numel() if isinstance(tensor, torch.Tensor) else None))
            return fn(tensor, *args, **kwargs)
        return wrapped

    for name, fn in originals.items():
        setattr(dist, name, recorder(name, fn))
    try:
        target, _ = _targets(50, 52, tp, seed=7)
        logits = _randn(8, B, S, 52 // tp).requires_grad_()
        mpu.vocab_parallel_cross_entropy(logits, target).sum().backward()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    only_small_all_reduces = all(name == "all_reduce" and n <= 2 * B * S for name, n in seen)
    errs[f"{tag}/only_small_all_reduces"] = 0.0 if seen and only_small_all_reduces else float("inf")
    errs[f"{tag}/two_collectives"] = 0.0 if len(seen) == 2 else float("inf")


def cross_entropy_errors(tp):
    """Errors of every check at the initialized TP size (run inside the shared
    launch of test_mpu_layers)."""
    errs = {}
    rank = mpu.get_tensor_model_parallel_rank()
    _loss_checks(errs, tp, rank, 50, 52, torch.float32, f"tp{tp}/padded_vocab")
    _loss_checks(errs, tp, rank, 64, 64, torch.float32, f"tp{tp}/exact_vocab")
    _loss_checks(errs, tp, rank, 50, 52, torch.bfloat16, f"tp{tp}/bf16")
    _tied_output_checks(errs, tp, rank, f"tp{tp}/tied_output_layer")
    _communication_checks(errs, tp, rank, f"tp{tp}/communication")
    return errs


def test_vocab_parallel_cross_entropy_equals_serial_at_tp4_and_tp2():
    for rank, result in enumerate(tp_launch_results()):
        errs = result["cross_entropy"]
        assert len(errs) > 20
        # A value is an error (tolerance ATOL) or an (error, tolerance) pair.
        bad = {k: v for k, v in errs.items()
               if not (v[0] <= v[1] if isinstance(v, tuple) else v <= ATOL)}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_single_process_matches_cross_entropy_and_autograd(dtype):
    """TP=1 (no process group): loss and hand-written backward equal autograd's."""
    logits_full = _randn(10, S, B, 40, scale=3.0).to(dtype)
    target = torch.randint(0, 40, (S, B), generator=torch.Generator().manual_seed(11))
    logits = logits_full.clone().requires_grad_()
    loss = mpu.vocab_parallel_cross_entropy(logits, target)
    loss.sum().backward()
    ref_logits = logits_full.float().requires_grad_()
    ref = F.cross_entropy(ref_logits.view(-1, 40), target.view(-1), reduction="none").view(S, B)
    ref.sum().backward()
    assert loss.dtype == torch.float32 and loss.shape == target.shape
    assert _err(loss, ref) <= (ATOL if dtype == torch.float32 else 1e-5)
    assert logits.grad.dtype == dtype
    tol = ATOL if dtype == torch.float32 else 1e-2
    assert _err(logits.grad, ref_logits.grad) <= tol


def test_int32_targets_work():
    logits = torch.randn(4, 7)
    target = torch.tensor([0, 6, 3, 2], dtype=torch.int32)
    loss = mpu.vocab_parallel_cross_entropy(logits, target)
    assert _err(loss, F.cross_entropy(logits, target.long(), reduction="none")) <= ATOL


def test_large_logits_stay_finite():
    """The max is subtracted before exp: logits of 1e4 give finite losses."""
    logits = torch.tensor([[1e4, 0.0, -1e4], [1e4, 1e4, 1e4]], requires_grad=True)
    loss = mpu.vocab_parallel_cross_entropy(logits, torch.tensor([1, 2]))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    assert abs(loss[0].item() - 1e4) < 1e-2
    assert abs(loss[1].item() - torch.log(torch.tensor(3.0)).item()) < 1e-6


def test_target_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"target shape \(3,\)"):
        mpu.vocab_parallel_cross_entropy(torch.zeros(2, 5), torch.zeros(3, dtype=torch.long))


def test_inplace_gives_the_same_loss_and_grad_bit_for_bit():
    """``inplace=True`` (the model's path) overwrites fp32 logits instead of copying them;
    loss and gradient are identical to the copying path, in fp32 and bf16."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(6, 5, 11, generator=torch.Generator().manual_seed(3)).to(dtype)
        target = torch.randint(0, 11, (6, 5), generator=torch.Generator().manual_seed(4))
        results = []
        for inplace in (False, True):
            leaf = x.clone().requires_grad_()
            logits = leaf * 1  # a non-leaf temporary, as the model's logits are
            loss = mpu.vocab_parallel_cross_entropy(logits, target, inplace=inplace)
            (loss * torch.arange(30.0).view(6, 5)).sum().backward()
            results.append((loss.detach(), leaf.grad, logits.detach().clone()))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
        # The copying path leaves the caller's logits alone; the in-place one reuses fp32 ones.
        assert torch.equal(results[0][2], x)
        assert torch.equal(results[1][2], x) == (dtype != torch.float32)
