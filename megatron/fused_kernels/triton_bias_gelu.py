"""gelu(x + bias) (tanh approximation) forward and backward as Triton kernels.

Like Megatron's fused bias-GeLU, the forward keeps only its inputs for the
backward, which recomputes x + bias inside the kernel instead of storing it.
Imported lazily; arithmetic in fp32, storage in the input dtype.
"""
import torch
import triton
import triton.language as tl

# The kernels spell sqrt(2/pi) = 0.7978845608028654 and GPT-2's 0.044715 as
# literals: plain module globals are not visible inside a jitted kernel.


@triton.jit
def _tanh(z):
    # tanh through the sigmoid keeps to primitives the interpreter and every backend have.
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _bias_gelu_fwd_kernel(x_ptr, b_ptr, y_ptr, n_elements, n_cols, BLOCK: tl.constexpr):
    # int64 offsets: tensors past 2**31 elements must not wrap around.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs % n_cols, mask=mask, other=0.0).to(tl.float32)
    z = x + b
    t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
    y = 0.5 * z * (1.0 + t)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(dy_ptr, x_ptr, b_ptr, dx_ptr, n_elements, n_cols, BLOCK: tl.constexpr):
    # int64 offsets: tensors past 2**31 elements must not wrap around.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs % n_cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = x + b
    t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
    dt = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z * z)
    grad = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * dt
    tl.store(dx_ptr + offs, (dy * grad).to(dx_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024


class TritonBiasGeLUFunction(torch.autograd.Function):
    """gelu_tanh(x + bias); bias broadcasts over the last dimension of x."""

    @staticmethod
    def forward(ctx, bias, x):
        x_c = x.contiguous()
        bias_c = bias.contiguous()
        y = torch.empty_like(x_c)
        n = x_c.numel()
        grid = (triton.cdiv(n, _BLOCK),)
        _bias_gelu_fwd_kernel[grid](x_c, bias_c, y, n, x_c.shape[-1], BLOCK=_BLOCK)
        ctx.save_for_backward(bias_c, x_c)
        return y

    @staticmethod
    def backward(ctx, dy):
        bias, x = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        n = x.numel()
        grid = (triton.cdiv(n, _BLOCK),)
        _bias_gelu_bwd_kernel[grid](dy, x, bias, dx, n, x.shape[-1], BLOCK=_BLOCK)
        # The bias gradient is a column sum; accumulate it in fp32 for half inputs.
        dbias = dx.reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32).to(bias.dtype)
        return dbias, dx


def bias_gelu_triton(bias, x):
    """gelu(x + bias) through the Triton kernels (autograd-aware)."""
    return TritonBiasGeLUFunction.apply(bias, x)
