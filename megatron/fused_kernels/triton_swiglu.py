"""SwiGLU forward and backward as Triton kernels: y = silu(g) * u with x = [g, u].

Imported lazily. The forward keeps only x for the backward; arithmetic in fp32,
storage in the input dtype.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _swiglu_fwd_kernel(x_ptr, y_ptr, n_elements, half, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    row = offs // half
    col = offs % half
    g = tl.load(x_ptr + row * 2 * half + col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * 2 * half + half + col, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, x_ptr, dx_ptr, n_elements, half, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    row = offs // half
    col = offs % half
    g_off = row * 2 * half + col
    g = tl.load(x_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + g_off + half, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dx_ptr + g_off, dg.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dx_ptr + g_off + half, (dy * silu).to(dx_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024


class TritonSwiGLUFunction(torch.autograd.Function):
    """silu(x[..., :f]) * x[..., f:] for x of last dimension 2f."""

    @staticmethod
    def forward(ctx, x):
        x_c = x.contiguous()
        half = x_c.shape[-1] // 2
        y = torch.empty(*x_c.shape[:-1], half, dtype=x_c.dtype, device=x_c.device)
        n = y.numel()
        _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](x_c, y, n, half, BLOCK=_BLOCK)
        ctx.save_for_backward(x_c)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        n = dy.numel()
        _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dy, x, dx, n, x.shape[-1] // 2, BLOCK=_BLOCK)
        return dx


def swiglu_triton(x):
    """silu(gate) * up of x = [gate, up] through the Triton kernels (autograd-aware)."""
    return TritonSwiGLUFunction.apply(x)
