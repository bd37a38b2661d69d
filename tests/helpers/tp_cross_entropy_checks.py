"""What each rank computes for test_cross_entropy in the shared mpu launch
(tests/helpers/tp_launch.py): the vocab-parallel cross entropy against
``F.cross_entropy`` on the full logits, for padded and exact vocabularies, targets on
partition edges, bf16 logits, the tied output layer (the transpose of the
vocab-parallel embedding), and that only small per-token tensors are communicated.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron import mpu
from tests.helpers.tp_layer_checks import ATOL, B, S, err, randn

H = 16


def _targets(vocab, padded_vocab, tp, seed):
    """Targets below ``vocab`` (padded rows never targeted), starting with every
    partition edge, then random ids."""
    per = padded_vocab // tp
    edges = [i * per + d for i in range(tp) for d in (-1, 0) if 0 <= i * per + d < vocab]
    fill = torch.randint(0, vocab, (B * S,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.tensor(edges + [vocab - 1]), fill])[: B * S].view(B, S), edges


def _loss_checks(errs, tp, rank, vocab, padded_vocab, dtype, tag):
    target, edges = _targets(vocab, padded_vocab, tp, seed=1)
    logits_full = randn(2, B, S, padded_vocab, scale=2.0).to(dtype)
    grad_loss = randn(3, B, S, scale=0.5)

    logits = logits_full.chunk(tp, -1)[rank].clone().requires_grad_()
    loss = mpu.vocab_parallel_cross_entropy(logits, target)
    (loss * grad_loss).sum().backward()

    ref_logits = logits_full.float().clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.view(-1, padded_vocab), target.view(-1), reduction="none").view(B, S)
    (ref * grad_loss).sum().backward()

    errs[f"{tag}/loss_fp32"] = 0.0 if loss.dtype == torch.float32 else float("inf")
    errs[f"{tag}/grad_dtype"] = 0.0 if logits.grad.dtype == dtype else float("inf")
    errs[f"{tag}/loss"] = err(loss, ref)
    tol = ATOL if dtype == torch.float32 else 1e-2  # bf16 rounding of the returned grad
    expected_grad = ref_logits.grad.chunk(tp, -1)[rank].to(dtype)
    errs[f"{tag}/logits_grad"] = (err(logits.grad, expected_grad), tol)
    errs[f"{tag}/edges_covered"] = 0.0 if all((target == e).any() for e in edges) else float("inf")


def _tied_output_checks(errs, tp, rank, tag):
    """Embedding lookup and the output layer share the vocab-parallel weight."""
    vocab, padded = 50, 52
    target, _ = _targets(vocab, padded, tp, seed=4)
    ids, _ = _targets(vocab, padded, tp, seed=5)
    w_full = randn(6, padded, H, scale=0.3)

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
    errs[f"{tag}/loss"] = err(loss, ref.view(B, S))
    errs[f"{tag}/weight_grad"] = err(emb.weight.grad, wr.grad.chunk(tp, 0)[rank])


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
        logits = randn(8, B, S, 52 // tp, scale=1.0).requires_grad_()
        mpu.vocab_parallel_cross_entropy(logits, target).sum().backward()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    only_small_all_reduces = all(name == "all_reduce" and n <= 2 * B * S for name, n in seen)
    errs[f"{tag}/only_small_all_reduces"] = 0.0 if seen and only_small_all_reduces else float("inf")
    errs[f"{tag}/two_collectives"] = 0.0 if len(seen) == 2 else float("inf")


def cross_entropy_errors(tp):
    """Errors of every check at the initialized TP size, by name: a max abs error
    (tolerance ATOL) or an (error, tolerance) pair; run inside the shared launch."""
    errs = {}
    rank = mpu.get_tensor_model_parallel_rank()
    _loss_checks(errs, tp, rank, 50, 52, torch.float32, f"tp{tp}/padded_vocab")
    _loss_checks(errs, tp, rank, 64, 64, torch.float32, f"tp{tp}/exact_vocab")
    _loss_checks(errs, tp, rank, 50, 52, torch.bfloat16, f"tp{tp}/bf16")
    _tied_output_checks(errs, tp, rank, f"tp{tp}/tied_output_layer")
    _communication_checks(errs, tp, rank, f"tp{tp}/communication")
    return errs
