"""What each rank computes for test_mpu_layers in the shared mpu launch
(tests/helpers/tp_launch.py): column / row parallel linears (gather_output,
input_is_parallel, sequence parallelism, skip_bias_add), the vocab-parallel embedding
with padding, and the mapping operators, each against plain ``torch.nn.functional`` on
the full weights, which every rank rebuilds from the same seeds. Each check reports a
max abs error by name; the parent compares them with ATOL.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron import mpu

ATOL = 1e-6
S, B, H_IN, H_OUT = 8, 3, 16, 24


def init_normal(t):
    """The layers' init method in these checks: normal, std 0.2."""
    torch.nn.init.normal_(t, mean=0.0, std=0.2)


def full_weight(seed, shape):
    """The master weight a layer built after ``torch.manual_seed(seed)`` holds."""
    torch.manual_seed(seed)
    w = torch.empty(shape)
    init_normal(w)
    return w


def err(actual, expected):
    """Max abs difference (inf when either is missing or the shapes differ)."""
    if actual is None or expected is None or actual.shape != expected.shape:
        return float("inf")
    return (actual.detach().float() - expected.detach().float()).abs().max().item()


def randn(seed, *shape, scale=0.2):
    """``scale`` x a seeded standard normal tensor of ``shape``."""
    # Values well below 1 so that fp32 rounding of reordered sums stays far
    # below ATOL: a wrong shard or a missing reduction is off by O(0.1).
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _column_checks(errs, tp, rank, gather_output, sequence_parallel, tag):
    x_full = randn(10, S, B, H_IN)
    w_full = full_weight(1, (H_OUT, H_IN))
    b_full = randn(11, H_OUT)
    g_full = randn(12, S, B, H_OUT)

    torch.manual_seed(1)
    layer = mpu.ColumnParallelLinear(H_IN, H_OUT, gather_output=gather_output,
                                     init_method=init_normal, sequence_parallel=sequence_parallel)
    with torch.no_grad():
        layer.bias.copy_(b_full.chunk(tp)[rank])
    errs[f"{tag}/weight_init"] = err(layer.weight, w_full.chunk(tp, 0)[rank])
    x = (x_full.chunk(tp, 0)[rank] if sequence_parallel else x_full).clone().requires_grad_()
    out, bias = layer(x)
    errs[f"{tag}/bias_none"] = 0.0 if bias is None else float("inf")
    g = g_full if gather_output else g_full.chunk(tp, -1)[rank]
    (out * g).sum().backward()

    xr = x_full.clone().requires_grad_()
    wr = w_full.clone().requires_grad_()
    br = b_full.clone().requires_grad_()
    ref = F.linear(xr, wr, br)
    (ref * g_full).sum().backward()

    errs[f"{tag}/output"] = err(out, ref if gather_output else ref.chunk(tp, -1)[rank])
    errs[f"{tag}/input_grad"] = err(x.grad, xr.grad.chunk(tp, 0)[rank] if sequence_parallel else xr.grad)
    errs[f"{tag}/weight_grad"] = err(layer.weight.grad, wr.grad.chunk(tp, 0)[rank])
    errs[f"{tag}/bias_grad"] = err(layer.bias.grad, br.grad.chunk(tp)[rank])
    ok = layer.weight.tensor_model_parallel and layer.weight.partition_dim == 0 \
        and layer.bias.tensor_model_parallel and layer.weight.partition_stride == 1
    # The shard owns its memory: no view keeping the full master weight alive.
    errs[f"{tag}/shard_storage"] = float(
        layer.weight.untyped_storage().nbytes() - layer.weight.numel() * layer.weight.element_size())
    errs[f"{tag}/attributes"] = 0.0 if ok else float("inf")


def _column_sequence_parallel_saved_checks(errs, tp, rank, tag):
    """With sequence parallelism autograd keeps only this rank's [s/tp, b, h]
    input shard (re-gathered in backward), never the gathered [s, b, h] input;
    with ``skip_bias_add`` the output and weight grad still equal the serial
    ones and the unused bias gets no grad."""
    x_full = randn(20, S, B, H_IN)
    w_full = full_weight(2, (H_OUT, H_IN))
    g_full = randn(21, S, B, H_OUT)
    torch.manual_seed(2)
    layer = mpu.ColumnParallelLinear(H_IN, H_OUT, gather_output=False, init_method=init_normal,
                                     sequence_parallel=True, skip_bias_add=True)
    x = x_full.chunk(tp, 0)[rank].clone().requires_grad_()
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    saved = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, bias = layer(x)
    errs[f"{tag}/saves_only_shard"] = float(abs(sum(saved.values()) - x.numel() * x.element_size()))
    errs[f"{tag}/bias_returned"] = 0.0 if bias is layer.bias else float("inf")
    (out * g_full.chunk(tp, -1)[rank]).sum().backward()
    xr = x_full.clone().requires_grad_()
    wr = w_full.clone().requires_grad_()
    ref = F.linear(xr, wr)
    (ref * g_full).sum().backward()
    errs[f"{tag}/output"] = err(out, ref.chunk(tp, -1)[rank])
    errs[f"{tag}/input_grad"] = err(x.grad, xr.grad.chunk(tp, 0)[rank])
    errs[f"{tag}/weight_grad"] = err(layer.weight.grad, wr.grad.chunk(tp, 0)[rank])
    errs[f"{tag}/unused_bias_no_grad"] = 0.0 if layer.bias.grad is None else float("inf")


def _row_checks(errs, tp, rank, input_is_parallel, sequence_parallel, skip_bias_add, tag):
    x_full = randn(20, S, B, H_OUT)
    w_full = full_weight(2, (H_IN, H_OUT))
    b_full = randn(21, H_IN)
    g_full = randn(22, S, B, H_IN)

    torch.manual_seed(2)
    layer = mpu.RowParallelLinear(H_OUT, H_IN, input_is_parallel=input_is_parallel,
                                  init_method=init_normal, sequence_parallel=sequence_parallel,
                                  skip_bias_add=skip_bias_add)
    with torch.no_grad():
        layer.bias.copy_(b_full)
    errs[f"{tag}/weight_init"] = err(layer.weight, w_full.chunk(tp, 1)[rank])
    x = (x_full.chunk(tp, -1)[rank] if input_is_parallel else x_full).clone().requires_grad_()
    out, bias = layer(x)
    if skip_bias_add:
        errs[f"{tag}/bias_returned"] = 0.0 if bias is layer.bias else float("inf")
        out = out + bias
    else:
        errs[f"{tag}/bias_none"] = 0.0 if bias is None else float("inf")
    g = g_full.chunk(tp, 0)[rank] if sequence_parallel else g_full
    (out * g).sum().backward()

    xr = x_full.clone().requires_grad_()
    wr = w_full.clone().requires_grad_()
    br = b_full.clone().requires_grad_()
    ref = F.linear(xr, wr, br)
    (ref * g_full).sum().backward()

    errs[f"{tag}/output"] = err(out, ref.chunk(tp, 0)[rank] if sequence_parallel else ref)
    errs[f"{tag}/input_grad"] = err(x.grad, xr.grad.chunk(tp, -1)[rank] if input_is_parallel else xr.grad)
    errs[f"{tag}/weight_grad"] = err(layer.weight.grad, wr.grad.chunk(tp, 1)[rank])
    bias_grad = layer.bias.grad.clone()
    if sequence_parallel:
        # Each rank saw its slice of the sequence; finalize_model_grads sums them.
        dist.all_reduce(bias_grad, group=mpu.get_tensor_model_parallel_group())
    errs[f"{tag}/bias_grad"] = err(bias_grad, br.grad)
    ok = layer.weight.tensor_model_parallel and layer.weight.partition_dim == 1 \
        and layer.bias.tensor_model_parallel is False \
        and layer.bias.sequence_parallel == sequence_parallel \
        and mpu.param_is_not_tensor_parallel_duplicate(layer.bias) == (rank == 0) \
        and mpu.param_is_not_tensor_parallel_duplicate(layer.weight)
    errs[f"{tag}/attributes"] = 0.0 if ok else float("inf")


def _embedding_checks(errs, tp, rank, vocab, padded_vocab, tag):
    """Padded vocabulary: ids only below ``vocab``, including partition edges."""
    per = padded_vocab // tp
    edges = [i * per + d for i in range(tp) for d in (-1, 0) if 0 <= i * per + d < vocab]
    fill = torch.randint(0, vocab, (B * S,), generator=torch.Generator().manual_seed(30))
    ids = torch.cat([torch.tensor(edges + [vocab - 1]), fill])[: B * S].view(B, S)
    w_full = full_weight(3, (padded_vocab, H_IN))
    g_full = randn(31, B, S, H_IN)

    torch.manual_seed(3)
    emb = mpu.VocabParallelEmbedding(padded_vocab, H_IN, init_method=init_normal)
    out = emb(ids)
    (out * g_full).sum().backward()
    errs[f"{tag}/shard_storage"] = float(
        emb.weight.untyped_storage().nbytes() - emb.weight.numel() * emb.weight.element_size())

    wr = w_full.clone().requires_grad_()
    ref = F.embedding(ids, wr)
    (ref * g_full).sum().backward()
    errs[f"{tag}/output"] = err(out, ref)
    errs[f"{tag}/weight_grad"] = err(emb.weight.grad, wr.grad.chunk(tp, 0)[rank])
    padded_rows = emb.weight.grad[max(0, vocab - rank * per):]
    errs[f"{tag}/padded_rows_grad_zero"] = padded_rows.abs().max().item() if padded_rows.numel() else 0.0
    errs[f"{tag}/edges_covered"] = 0.0 if all((ids == e).any() for e in edges) else float("inf")


def _mapping_checks(errs, tp, rank, tag):
    """The sequence-parallel operators that the layers do not exercise alone."""
    x_full = randn(40, S, B, H_IN)
    g_full = randn(41, S, B, H_IN)

    # scatter along the sequence: forward keeps this rank's slice; backward
    # all-gathers every rank's gradient slice.
    x = x_full.clone().requires_grad_()
    y = mpu.scatter_to_sequence_parallel_region(x)
    errs[f"{tag}/sp_scatter_fwd"] = err(y, x_full.chunk(tp, 0)[rank])
    (y * g_full.chunk(tp, 0)[rank]).sum().backward()
    errs[f"{tag}/sp_scatter_bwd"] = err(x.grad, g_full)

    # gather along the sequence into a replicated consumer: backward splits.
    x = x_full.chunk(tp, 0)[rank].clone().requires_grad_()
    y = mpu.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
    errs[f"{tag}/sp_gather_fwd"] = err(y, x_full)
    (y * g_full).sum().backward()
    errs[f"{tag}/sp_gather_split_bwd"] = err(x.grad, g_full.chunk(tp, 0)[rank])

    # gather into a TP-split consumer: backward reduce-scatters the rank-
    # dependent partial gradients.
    x = x_full.chunk(tp, 0)[rank].clone().requires_grad_()
    y = mpu.gather_from_sequence_parallel_region(x)
    (y * g_full * (rank + 1)).sum().backward()
    expected = g_full.chunk(tp, 0)[rank] * sum(r + 1 for r in range(tp))
    errs[f"{tag}/sp_gather_reduce_scatter_bwd"] = err(x.grad, expected)

    # last-dim scatter / gather round trip with its gradients.
    x = x_full.clone().requires_grad_()
    y = mpu.scatter_to_tensor_model_parallel_region(x)
    errs[f"{tag}/scatter_fwd"] = err(y, x_full.chunk(tp, -1)[rank])
    z = mpu.gather_from_tensor_model_parallel_region(y * (rank + 1))
    expected = torch.cat([c * (r + 1) for r, c in enumerate(x_full.chunk(tp, -1))], dim=-1)
    errs[f"{tag}/gather_fwd"] = err(z, expected)
    (z * g_full).sum().backward()
    errs[f"{tag}/scatter_gather_bwd"] = err(
        x.grad, torch.cat([c * (r + 1) for r, c in enumerate(g_full.chunk(tp, -1))], dim=-1))

    # f and g: inputs differ per rank; g sums them forward, f sums grads backward.
    x = (x_full * (rank + 1)).requires_grad_()
    y = mpu.reduce_from_tensor_model_parallel_region(x)
    errs[f"{tag}/g_fwd"] = err(y, x_full * sum(r + 1 for r in range(tp)))
    errs[f"{tag}/g_keeps_input"] = err(x, x_full * (rank + 1))
    (y * g_full).sum().backward()
    errs[f"{tag}/g_bwd"] = err(x.grad, g_full)
    x = x_full.clone().requires_grad_()
    y = mpu.copy_to_tensor_model_parallel_region(x)
    errs[f"{tag}/f_fwd"] = err(y, x_full)
    (y * g_full * (rank + 1)).sum().backward()
    errs[f"{tag}/f_bwd"] = err(x.grad, g_full * sum(r + 1 for r in range(tp)))


def layer_errors(tp):
    """Max abs errors of every layer and mapping check at the initialized TP size, by
    name (run inside the shared launch; the tests compare them with ATOL)."""
    rank = mpu.get_tensor_model_parallel_rank()
    errs = {}
    for gather in (True, False):
        _column_checks(errs, tp, rank, gather, False, f"tp{tp}/column_gather={gather}")
    _column_checks(errs, tp, rank, False, True, f"tp{tp}/column_sequence_parallel")
    _column_sequence_parallel_saved_checks(errs, tp, rank, f"tp{tp}/column_sp_saved")
    for parallel in (True, False):
        _row_checks(errs, tp, rank, parallel, False, False, f"tp{tp}/row_input_is_parallel={parallel}")
    _row_checks(errs, tp, rank, True, False, True, f"tp{tp}/row_skip_bias_add")
    _row_checks(errs, tp, rank, True, True, False, f"tp{tp}/row_sequence_parallel")
    _embedding_checks(errs, tp, rank, 50, 52, f"tp{tp}/embedding_padded")
    _embedding_checks(errs, tp, rank, 64, 64, f"tp{tp}/embedding")
    _mapping_checks(errs, tp, rank, f"tp{tp}/mappings")
    return errs


def indivisible_messages():
    """The error messages of layers whose sizes TP does not divide (None: no error)."""
    messages = []
    for build in (lambda: mpu.ColumnParallelLinear(4, 7, init_method=init_normal),
                  lambda: mpu.RowParallelLinear(5, 4, init_method=init_normal),
                  lambda: mpu.VocabParallelEmbedding(51, 4, init_method=init_normal)):
        try:
            build()
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    return messages
