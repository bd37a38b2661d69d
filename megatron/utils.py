"""Small helpers of the training loop: the precision table, unwrapping, norms, loss averaging,
perplexity."""
import math

import torch

# training.precision -> the dtype of the model (and of the tensors between pipeline stages).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def unwrap_model(chunk):
    """The plain model inside DDP / torch.compile wrappers (any nesting of ``.module`` /
    ``._orig_mod``), so state-dict names and ``set_input_tensor`` are the model's own."""
    while True:
        inner = getattr(chunk, "module", None)
        if inner is None:
            inner = getattr(chunk, "_orig_mod", None)
        if inner is None:
            return chunk
        chunk = inner


def calc_params_l2_norm(model_chunks):
    """L2 norm of all parameters over the model-parallel group, counting each weight once.

    Replicated parameters are counted on TP rank 0 only; the copy of the tied
    word embedding on the last pipeline stage (`shared_embedding`) is skipped.
    """
    from megatron import mpu
    total = None
    tp_rank = mpu.get_tensor_model_parallel_rank()
    for chunk in model_chunks:
        for p in unwrap_model(chunk).parameters():
            if getattr(p, "shared_embedding", False):
                continue
            if not getattr(p, "tensor_model_parallel", False) and tp_rank != 0:
                continue
            sq = p.detach().float().pow(2).sum()
            total = sq if total is None else total + sq
    if total is None:
        total = torch.zeros((), device=_device_of(model_chunks))
    total = total.reshape(1)
    if mpu.model_parallel_is_initialized():
        mpu.all_reduce(total, group=mpu.get_model_parallel_group())
    return math.sqrt(total.item())


def _device_of(model_chunks):
    for chunk in model_chunks:
        for p in chunk.parameters():
            return p.device
    return torch.device("cpu")


def average_over_data_parallel(values, device):
    """Mean of a list of float values over the data-parallel group (one all-reduce)."""
    from megatron import mpu
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32,
                     device=device)
    if mpu.get_data_parallel_world_size() > 1:
        mpu.all_reduce(t, group=mpu.get_data_parallel_group())
        t /= mpu.get_data_parallel_world_size()
    return t.tolist()


def perplexity(loss):
    """exp(loss), capped at exp(20): a diverged loss would overflow a float (Megatron-LM
    caps it the same way); NaN for a non-finite loss."""
    return math.exp(min(20.0, loss)) if math.isfinite(loss) else float("nan")
