"""Every fused op against its plain-PyTorch reference, forward and backward, fp32/bf16/fp16, odd shapes.

Without a GPU the Triton kernels run on CPU under TRITON_INTERPRET=1 (set
before triton is imported: torch does not import it); with one, every check
also runs on CUDA, where the dispatchers pick Triton / torch.compile / flash
attention and the Triton kernels run for real. Triton tests skip where triton
is absent.
"""
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron import fused_kernels as fk

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Absolute tolerances relative to an fp32 reference: half formats round each stored value.
TOL = {torch.float32: 1e-5, torch.bfloat16: 6e-2, torch.float16: 8e-3}


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Triton kernels: the interpreter on CPU tensors, the real compiler on CUDA tensors.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _leaves(dtype, *shapes, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in shapes]


def _fp32_twins(tensors):
    return [t.detach().float().requires_grad_() for t in tensors]


def _check(fn, ref_fn, inputs, dtype, scale=1.0):
    """Run fn on `inputs` (dtype) and ref_fn on fp32 copies; compare outputs and every grad."""
    ref_inputs = _fp32_twins(inputs)
    out = fn(*inputs)
    ref = ref_fn(*ref_inputs)
    assert out.dtype == dtype and out.shape == ref.shape
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7)).to(ref.device)
    out.backward(grad.to(dtype))
    ref.backward(grad)
    tol = TOL[dtype] * scale
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    for t, r in zip(inputs, ref_inputs):
        assert t.grad is not None and t.grad.dtype == dtype
        torch.testing.assert_close(t.grad.float(), r.grad, atol=tol * 2, rtol=tol * 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_gelu_dispatch_matches_reference(dtype, device):
    bias, x = _leaves(dtype, (13,), (3, 5, 13), device=device)
    _check(fk.bias_gelu, fk.bias_gelu_reference, [bias, x], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_dropout_add_without_dropout_matches_reference(dtype, device):
    x, bias, res = _leaves(dtype, (7, 3, 11), (11,), (7, 3, 11), device=device)
    fn = lambda x, b, r: fk.bias_dropout_add(x, b, r, 0.3, False)  # noqa: E731
    ref = lambda x, b, r: fk.bias_dropout_add_reference(x, b, r, 0.3, False)  # noqa: E731
    _check(fn, ref, [x, bias, res], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_bias_dropout_add_dropout_draws_from_default_generator(device):
    x, bias, res = _leaves(torch.float32, (9, 2, 17), (17,), (9, 2, 17), device=device)
    torch.manual_seed(3)
    out = fk.bias_dropout_add(x, bias, res, 0.5, True)
    torch.manual_seed(3)
    again = fk.bias_dropout_add(x, bias, res, 0.5, True)
    torch.testing.assert_close(out, again)  # same seed, same mask
    if device == "cpu":
        torch.manual_seed(3)
        torch.testing.assert_close(out, fk.bias_dropout_add_reference(x, bias, res, 0.5, True))
    dropped = (out - res).detach() == 0
    assert 0.3 < dropped.float().mean().item() < 0.7
    # Kept elements are scaled by 1/(1-p), as inverted dropout must.
    torch.testing.assert_close((out - res)[~dropped], ((x + bias) * 2)[~dropped])
    out.sum().backward()
    torch.testing.assert_close(x.grad, (~dropped).float() * 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_module_matches_reference(dtype, device):
    """fk.LayerNorm is a drop-in for torch.nn.LayerNorm: the same state dict (keys,
    shapes, dtypes: checkpoints map 1:1 both ways) and, on the same weights, the output
    and gradients of torch.nn.LayerNorm in fp32."""
    ln = fk.LayerNorm(19, eps=1e-5).to(device=device, dtype=dtype)
    plain = torch.nn.LayerNorm(19, eps=1e-5).to(device=device, dtype=dtype)
    assert [(k, v.shape, v.dtype) for k, v in ln.state_dict().items()] == \
        [(k, v.shape, v.dtype) for k, v in plain.state_dict().items()]
    with torch.no_grad():
        ln.weight.copy_(torch.randn(19))
        ln.bias.copy_(torch.randn(19))
    plain.load_state_dict(ln.state_dict())
    ln.load_state_dict(plain.state_dict())
    (x,) = _leaves(dtype, (5, 3, 19), device=device)
    ref_ln = torch.nn.LayerNorm(19, eps=1e-5).to(device)
    ref_ln.load_state_dict({k: v.float() for k, v in ln.state_dict().items()})
    ref_x = x.detach().float().requires_grad_()
    out, ref = ln(x), ref_ln(ref_x)
    assert out.dtype == dtype and out.shape == ref.shape
    g = torch.randn(ref.shape).to(device)
    out.backward(g.to(dtype))
    ref.backward(g)
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad.float(), ref_x.grad, atol=2 * tol, rtol=2 * tol)
    torch.testing.assert_close(ln.weight.grad.float(), ref_ln.weight.grad, atol=4 * tol, rtol=4 * tol)
    torch.testing.assert_close(ln.bias.grad.float(), ref_ln.bias.grad, atol=4 * tol, rtol=4 * tol)
    if device == "cpu" and dtype == torch.float32:  # the same ATen kernel: equal bits
        assert torch.equal(ln(ref_x), ref_ln(ref_x))
    # A normalized shape of more than one dimension falls back to torch's own forward.
    wide, wide_ref = fk.LayerNorm((3, 19)).to(device), torch.nn.LayerNorm((3, 19)).to(device)
    with torch.no_grad():
        wide.weight.copy_(torch.randn(3, 19))
    wide_ref.load_state_dict(wide.state_dict())
    torch.testing.assert_close(wide(ref_x), wide_ref(ref_x), rtol=0, atol=0)


def test_layer_norm_mixed_dtypes_computes_in_fp32():
    w, b = _leaves(torch.float32, (9,), (9,))
    (x,) = _leaves(torch.bfloat16, (4, 9))
    out = fk.layer_norm(x, w, b, 1e-5)
    assert out.dtype == torch.bfloat16
    # fp32 statistics and affine, rounded to bf16 once at the end: equal bits.
    ref = F.layer_norm(x.detach().float(), (9,), w.detach(), b.detach(), 1e-5)
    assert torch.equal(out, ref.to(torch.bfloat16))
    # (bf16 weights would round the affine too: the check tells the two apart)
    half = F.layer_norm(x.detach(), (9,), w.detach().bfloat16(), b.detach().bfloat16(), 1e-5)
    assert not torch.equal(half, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_core_attention_matches_reference(dtype, device):
    # Odd sequence length and head size; scale given and default.
    q, k, v = _leaves(dtype, (2, 3, 13, 5), (2, 3, 13, 5), (2, 3, 13, 5), device=device)
    for scale in (None, 0.37):
        for t in (q, k, v):
            t.grad = None
        fn = lambda q, k, v: fk.core_attention(q, k, v, 0.0, True, scale)  # noqa: E731
        ref = lambda q, k, v: fk.core_attention_reference(q, k, v, 0.0, True, scale)  # noqa: E731
        _check(fn, ref, [q, k, v], dtype, scale=2.0)


def test_core_attention_is_causal_and_softmax_is_fp32_for_half():
    q, k, v = _leaves(torch.float32, (1, 2, 11, 4), (1, 2, 11, 4), (1, 2, 11, 4))
    out = fk.core_attention(q, k, v)
    v2 = v.detach().clone()
    v2[:, :, 6:] += 100.0  # future values must not leak into earlier positions
    out2 = fk.core_attention(q.detach(), k.detach(), v2)
    torch.testing.assert_close(out[:, :, :6].detach(), out2[:, :, :6])
    assert not torch.allclose(out[:, :, 6:].detach(), out2[:, :, 6:])
    # Large logits overflow an fp16 softmax computed in fp16 (exp(>11) > 65504) but not an fp32 one.
    qh = (torch.randn(1, 1, 9, 8) * 30).half()
    kh = (torch.randn(1, 1, 9, 8) * 30).half()
    vh = torch.randn(1, 1, 9, 8).half()
    for fn in (fk.core_attention, fk.core_attention_reference):
        o = fn(qh, kh, vh)
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o.float(), fk.core_attention_reference(qh.float(), kh.float(), vh.float()),
                                   atol=2e-2, rtol=2e-2)


def test_core_attention_dropout_draws_from_default_generator():
    q, k, v = [t.detach() for t in _leaves(torch.float32, (2, 2, 16, 8), (2, 2, 16, 8), (2, 2, 16, 8))]
    torch.manual_seed(11)
    a = fk.core_attention(q, k, v, 0.5, True)
    torch.manual_seed(11)
    b = fk.core_attention(q, k, v, 0.5, True)
    c = fk.core_attention(q, k, v, 0.5, True)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(b, c)
    assert not torch.allclose(a, fk.core_attention(q, k, v, 0.5, False))
    torch.testing.assert_close(fk.core_attention(q, k, v, 0.5, False), fk.core_attention_reference(q, k, v))


def test_forced_reference_env(monkeypatch):
    bias, x = _leaves(torch.float32, (6,), (4, 6))
    monkeypatch.setenv("MEGATRON_FUSED_KERNELS", "reference")
    torch.testing.assert_close(fk.bias_gelu(bias, x), fk.bias_gelu_reference(bias, x))
    # Forced references never claim to fuse, so the model adds biases inside its GEMMs.
    assert not fk.bias_gelu_fuses(x) and not fk.bias_dropout_add_fuses(x)


@pytest.mark.parametrize("device", DEVICES)
def test_without_bias_ops_are_plain_gelu_and_residual_add(device):
    """bias=None (the bias went into the GEMM) on every path; fusing is claimed on CUDA only."""
    x, residual = _leaves(torch.float32, (4, 6), (4, 6), device=device)
    torch.testing.assert_close(fk.bias_gelu(None, x), F.gelu(x, approximate="tanh"), rtol=0, atol=0)
    torch.testing.assert_close(fk.bias_dropout_add(x, None, residual, 0.0, True), residual + x,
                               rtol=0, atol=0)
    assert fk.bias_dropout_add_fuses(x) == (device == "cuda")
    if device == "cpu":
        assert not fk.bias_gelu_fuses(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_layer_norm_matches_reference(dtype):
    pytest.importorskip("triton")
    from megatron.fused_kernels.triton_layer_norm import layer_norm_triton
    x, w, b = _leaves(dtype, (3, 7, 37), (37,), (37,), device=TRITON_DEVICE)
    _check(lambda x, w, b: layer_norm_triton(x, w, b, 1e-5),
           lambda x, w, b: fk.layer_norm_reference(x, w, b, 1e-5), [x, w, b], dtype, scale=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_bias_gelu_matches_reference(dtype):
    pytest.importorskip("triton")
    from megatron.fused_kernels.triton_bias_gelu import bias_gelu_triton
    # 5*3*67 elements: not a multiple of the block, so the tail mask is exercised.
    bias, x = _leaves(dtype, (67,), (5, 3, 67), device=TRITON_DEVICE)
    _check(bias_gelu_triton, fk.bias_gelu_reference, [bias, x], dtype, scale=2.0)


def test_compiled_bias_add_matches_reference():
    # The torch.compile path CUDA takes for bias-dropout-add (dropout off here: inductor's RNG
    # stream differs from eager's, so only the deterministic part can be compared).
    from megatron.fused_kernels.bias_dropout_add import bias_add_compiled
    x, bias, res = _leaves(torch.float32, (7, 3, 11), (11,), (7, 3, 11))
    _check(bias_add_compiled, lambda x, b, r: fk.bias_dropout_add_reference(x, b, r, 0.0, False),
           [x, bias, res], torch.float32)
    assert not bias_add_compiled.failed


# ---------------------------------------------------------------- Llama-style ops
def _rotary_tables(s, b, rot, device="cpu", seed=3):
    """fp32 cos / sin [s, b, 1, rot] of random positions (both halves share each angle)."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(s, b, 1, rot // 2, generator=g) * 50
    angles = torch.cat([angles, angles], dim=-1).to(device)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_module_matches_reference(dtype, device):
    norm = fk.RMSNorm(19, eps=1e-5).to(device=device, dtype=dtype)
    assert list(norm.state_dict()) == ["weight"] and torch.equal(norm.weight, torch.ones_like(norm.weight))
    with torch.no_grad():
        norm.weight.copy_(torch.randn(19))
    (x,) = _leaves(dtype, (5, 3, 19), device=device)
    _check(lambda x, w: fk.rms_norm(x, w, 1e-5), lambda x, w: fk.rms_norm_reference(x, w, 1e-5),
           [x, norm.weight], dtype, scale=2.0)
    # the reference is what the formula says: x / sqrt(mean(x^2) + eps) * w
    xf, wf = x.detach().float(), norm.weight.detach().float()
    want = xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * wf
    torch.testing.assert_close(fk.rms_norm_reference(xf, wf, 1e-5), want)


def test_rms_norm_mixed_dtypes_computes_in_fp32():
    (w,) = _leaves(torch.float32, (9,))
    (x,) = _leaves(torch.bfloat16, (4, 9))
    out = fk.rms_norm(x, w, 1e-5)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, fk.rms_norm_reference(x.detach().float(), w.detach(), 1e-5).bfloat16())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_reference(dtype, device):
    (x,) = _leaves(dtype, (3, 5, 2 * 19), device=device)
    _check(fk.swiglu, fk.swiglu_reference, [x], dtype, scale=2.0)
    gate, up = x.detach().float().chunk(2, dim=-1)
    torch.testing.assert_close(fk.swiglu_reference(x.detach().float()), gate * torch.sigmoid(gate) * up)
    with pytest.raises(ValueError, match="even last dimension"):
        fk.swiglu(torch.ones(3, 7))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_embedding_matches_reference(dtype, device):
    # Odd heads, a head size of 10 of which 6 dims rotate, queries read through a strided
    # view (as attention slices them out of the fused QKV output).
    (qkv,) = _leaves(dtype, (7, 3, 5, 12), device=device)
    cos, sin = _rotary_tables(7, 3, 6, device)
    _check(lambda t: fk.rotary_embedding(t[:, :, 1:4, :10], cos, sin),
           lambda t: fk.rotary_embedding_reference(t[:, :, 1:4, :10], cos, sin), [qkv], dtype,
           scale=2.0)


def test_rotary_reference_is_the_rotate_half_formula():
    (x,) = _leaves(torch.float32, (4, 2, 3, 8))
    cos, sin = _rotary_tables(4, 2, 8)
    x1, x2 = x.detach()[..., :4], x.detach()[..., 4:]
    c, s = cos[..., :4], sin[..., :4]
    want = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    torch.testing.assert_close(fk.rotary_embedding_reference(x.detach(), cos, sin), want)
    # half inputs: rotated in fp32, rounded once
    xh = x.detach().bfloat16()
    assert torch.equal(fk.rotary_embedding_reference(xh, cos, sin),
                       fk.rotary_embedding_reference(xh.float(), cos, sin).bfloat16())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_core_attention_grouped_query_matches_repeated_heads(dtype, device):
    """K/V with 2 heads for 6 query heads: the fused path equals the reference, and both
    equal plain attention on K/V heads repeated for their groups (query head i reads group i // 3)."""
    q, k, v = _leaves(dtype, (2, 6, 11, 5), (2, 2, 11, 5), (2, 2, 11, 5), device=device)
    _check(fk.core_attention, fk.core_attention_reference, [q, k, v], dtype, scale=2.0)
    rep = [t.detach().float().repeat_interleave(3, dim=1) for t in (k, v)]
    torch.testing.assert_close(fk.core_attention_reference(q.detach().float(), *[t.detach().float() for t in (k, v)]),
                               fk.core_attention_reference(q.detach().float(), *rep))


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_rms_norm_matches_reference(dtype):
    pytest.importorskip("triton")
    from megatron.fused_kernels.triton_rms_norm import rms_norm_triton
    x, w = _leaves(dtype, (3, 7, 37), (37,), device=TRITON_DEVICE)
    _check(lambda x, w: rms_norm_triton(x, w, 1e-5),
           lambda x, w: fk.rms_norm_reference(x, w, 1e-5), [x, w], dtype, scale=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_swiglu_matches_reference(dtype):
    pytest.importorskip("triton")
    from megatron.fused_kernels.triton_swiglu import swiglu_triton
    # 5*3*67 outputs: not a multiple of the block, so the tail mask is exercised.
    (x,) = _leaves(dtype, (5, 3, 2 * 67), device=TRITON_DEVICE)
    _check(swiglu_triton, fk.swiglu_reference, [x], dtype, scale=2.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_rotary_embedding_matches_reference(dtype):
    pytest.importorskip("triton")
    from megatron.fused_kernels.triton_rotary import rotary_embedding_triton
    # a strided view (3 of 5 heads, 10 of 12 dims) with 6 rotated dims; odd s and b
    (qkv,) = _leaves(dtype, (7, 3, 5, 12), device=TRITON_DEVICE)
    cos, sin = _rotary_tables(7, 3, 6, TRITON_DEVICE)
    _check(lambda t: rotary_embedding_triton(t[:, :, 1:4, :10], cos, sin),
           lambda t: fk.rotary_embedding_reference(t[:, :, 1:4, :10], cos, sin), [qkv], dtype,
           scale=2.0)
