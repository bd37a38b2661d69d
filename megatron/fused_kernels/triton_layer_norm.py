"""LayerNorm forward and backward as Triton kernels, wrapped in an autograd Function.

Imported lazily (only when a CUDA tensor, or a test under ``TRITON_INTERPRET=1``,
asks for it), so triton is never required. Statistics and the arithmetic are
fp32 whatever the storage dtype; outputs are stored in the input dtype.
"""
import torch
import triton
import triton.language as tl

# One program normalizes one whole row, so the row must fit in registers/SRAM.
MAX_FUSED_SIZE = 65536


@triton.jit
def _ln_fwd_kernel(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, stride, n_cols, eps,
                   BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * stride may pass 2**31
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * w + b
    tl.store(y_ptr + row * stride + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _ln_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                   stride, n_rows, n_cols, rows_per_prog, BLOCK: tl.constexpr):
    # Each program walks a band of rows: dx row by row, and the weight/bias
    # gradients summed over the band in fp32 (one partial row per program,
    # reduced afterwards), which avoids atomics and keeps the result deterministic.
    pid = tl.program_id(0).to(tl.int64)  # row * stride may pass 2**31
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_prog
    for i in range(0, rows_per_prog):
        row = row_start + i
        if row < n_rows:
            x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + row)
            rstd = tl.load(rstd_ptr + row)
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, axis=0) / n_cols
            c2 = tl.sum(wdy, axis=0) / n_cols
            dx = (wdy - (xhat * c1 + c2)) * rstd
            tl.store(dx_ptr + row * stride + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw_acc += dy * xhat
            db_acc += dy
    tl.store(dw_part_ptr + pid * n_cols + cols, dw_acc, mask=mask)
    tl.store(db_part_ptr + pid * n_cols + cols, db_acc, mask=mask)


def _block_size(n_cols):
    block = triton.next_power_of_2(n_cols)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"Triton LayerNorm supports rows of at most {MAX_FUSED_SIZE} elements, got {n_cols}")
    return block


def _num_warps(block):
    return min(max(block // 256, 1), 16)


def _row_partition(x2):
    """(programs, rows per program) of a row-norm backward over ``x2`` [rows, cols]: enough
    programs to fill the device, few enough that their partial weight sums stay small."""
    n_rows = x2.shape[0]
    if x2.is_cuda:
        n_progs = torch.cuda.get_device_properties(x2.device).multi_processor_count * 4
    else:
        n_progs = 4
    rows_per_prog = triton.cdiv(n_rows, max(1, min(n_progs, n_rows)))
    return triton.cdiv(n_rows, rows_per_prog), rows_per_prog


class TritonLayerNormFunction(torch.autograd.Function):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last dimension."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n_cols = x.shape[-1]
        x2 = x.reshape(-1, n_cols).contiguous()
        n_rows = x2.shape[0]
        y = torch.empty_like(x2)
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block = _block_size(n_cols)
        num_warps = _num_warps(block)
        _ln_fwd_kernel[(n_rows,)](x2, y, weight, bias, mean, rstd, x2.stride(0), n_cols, eps,
                                  BLOCK=block, num_warps=num_warps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols).contiguous()
        dx = torch.empty_like(x2)
        block = _block_size(n_cols)
        n_progs, rows_per_prog = _row_partition(x2)
        dw_part = torch.empty(n_progs, n_cols, dtype=torch.float32, device=x2.device)
        db_part = torch.empty(n_progs, n_cols, dtype=torch.float32, device=x2.device)
        num_warps = _num_warps(block)
        _ln_bwd_kernel[(n_progs,)](dy2, x2, weight, mean, rstd, dx, dw_part, db_part,
                                   x2.stride(0), n_rows, n_cols, rows_per_prog,
                                   BLOCK=block, num_warps=num_warps)
        dw = dw_part.sum(0).to(weight.dtype)
        db = db_part.sum(0).to(weight.dtype)
        return dx.view(ctx.x_shape), dw, db, None


def layer_norm_triton(x, weight, bias, eps):
    """LayerNorm over the last dimension through the Triton kernels (autograd-aware)."""
    return TritonLayerNormFunction.apply(x, weight, bias, eps)
