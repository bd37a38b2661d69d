"""RoPE forward and backward as one Triton kernel (the backward rotates by minus the angle).

Imported lazily. One program handles one head of one token: it loads the head,
its rotation partners (i + rot/2 or i - rot/2) and the token's cos / sin, and
writes the rotated head to a contiguous output. Arithmetic in fp32.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, batch, heads, stride_s, stride_b,
                   stride_h, head_dim, rot, sin_sign, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row = pid // heads          # token index s * batch + b
    h = pid % heads
    x_base = (row // batch) * stride_s + (row % batch) * stride_b + h * stride_h
    cols = tl.arange(0, BLOCK)
    half = rot // 2
    in_head = cols < head_dim
    rotated = cols < rot
    x = tl.load(x_ptr + x_base + cols, mask=in_head, other=0.0).to(tl.float32)
    partner = tl.where(cols < half, cols + half, cols - half)
    xp = tl.load(x_ptr + x_base + partner, mask=rotated, other=0.0).to(tl.float32)
    freq = cols % half
    c = tl.load(cos_ptr + row * rot + freq, mask=rotated, other=1.0)
    s = tl.load(sin_ptr + row * rot + freq, mask=rotated, other=0.0)
    sign = tl.where(cols < half, -1.0, 1.0) * sin_sign
    y = x * c + sign * xp * s
    tl.store(y_ptr + pid * head_dim + cols, y.to(y_ptr.dtype.element_ty), mask=in_head)


def _rotate(x, cos, sin, sin_sign):
    s, b, heads, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    rot = cos.shape[-1]
    y = torch.empty(s, b, heads, head_dim, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(head_dim)
    _rotary_kernel[(s * b * heads,)](x, cos, sin, y, b, heads, x.stride(0), x.stride(1),
                                     x.stride(2), head_dim, rot, sin_sign, BLOCK=block)
    return y


class TritonRotaryFunction(torch.autograd.Function):
    """RoPE of x [s, b, heads, hn] with fp32 cos / sin [s, b, 1, rot]; no grads for the angles."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        s, b = x.shape[:2]
        rot = cos.shape[-1]
        cos2 = cos.float().expand(s, b, 1, rot).reshape(s * b, rot).contiguous()
        sin2 = sin.float().expand(s, b, 1, rot).reshape(s * b, rot).contiguous()
        ctx.save_for_backward(cos2, sin2)
        return _rotate(x, cos2, sin2, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos2, sin2 = ctx.saved_tensors
        # The rotation is orthogonal: its transpose rotates by minus the angle.
        return _rotate(dy, cos2, sin2, -1.0), None, None


def rotary_embedding_triton(x, cos, sin):
    """RoPE through the Triton kernel (autograd-aware); see rotary.rotary_embedding_reference."""
    return TritonRotaryFunction.apply(x, cos, sin)
