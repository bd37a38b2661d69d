"""RMSNorm forward and backward as Triton kernels, wrapped in an autograd Function.

Imported lazily, as triton_layer_norm is. One program normalizes one row; the
arithmetic is fp32 whatever the storage dtype, outputs are stored in the input dtype.
"""
import torch
import triton
import triton.language as tl

from .triton_layer_norm import _block_size, _num_warps, _row_partition


@triton.jit
def _rms_fwd_kernel(x_ptr, y_ptr, w_ptr, rstd_ptr, stride, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * stride may pass 2**31
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, stride, n_rows,
                    n_cols, rows_per_prog, BLOCK: tl.constexpr):
    # Each program walks a band of rows; the weight gradient is summed over the band
    # in fp32 (one partial row per program, reduced afterwards): no atomics, deterministic.
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_prog
    for i in range(0, rows_per_prog):
        row = row_start + i
        if row < n_rows:
            x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            xhat = x * rstd
            wdy = w * dy
            c = tl.sum(xhat * wdy, axis=0) / n_cols
            dx = (wdy - xhat * c) * rstd
            tl.store(dx_ptr + row * stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
    tl.store(dw_part_ptr + pid * n_cols + cols, dw_acc, mask=mask)


class TritonRMSNormFunction(torch.autograd.Function):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        n_cols = x.shape[-1]
        x2 = x.reshape(-1, n_cols).contiguous()
        n_rows = x2.shape[0]
        y = torch.empty_like(x2)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = _block_size(n_cols)
        num_warps = _num_warps(block)
        _rms_fwd_kernel[(n_rows,)](x2, y, weight, rstd, x2.stride(0), n_cols, eps,
                                   BLOCK=block, num_warps=num_warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols).contiguous()
        dx = torch.empty_like(x2)
        block = _block_size(n_cols)
        n_progs, rows_per_prog = _row_partition(x2)
        dw_part = torch.empty(n_progs, n_cols, dtype=torch.float32, device=x2.device)
        num_warps = _num_warps(block)
        _rms_bwd_kernel[(n_progs,)](dy2, x2, weight, rstd, dx, dw_part, x2.stride(0), n_rows,
                                    n_cols, rows_per_prog, BLOCK=block, num_warps=num_warps)
        return dx.view(ctx.x_shape), dw_part.sum(0).to(weight.dtype), None


def rms_norm_triton(x, weight, eps):
    """RMSNorm over the last dimension through the Triton kernels (autograd-aware)."""
    return TritonRMSNormFunction.apply(x, weight, eps)
