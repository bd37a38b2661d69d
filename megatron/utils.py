"""Small helpers of the training loop: norms, loss averaging, a text sample."""
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


@torch.no_grad()
def generate_sample(model, tokenizer, prompt, num_tokens, seq_length, device, top_k=1, seed=1234):
    """Continue `prompt` by `num_tokens` tokens with one model chunk (no pipelining).

    Greedy when top_k is 1, otherwise top-k sampling from a seeded generator so
    the sample is reproducible. Logits of padded vocabulary entries are ignored.
    """
    from megatron import mpu
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    ids = tokenizer.tokenize(prompt)
    if not ids:
        ids = [tokenizer.eod]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(num_tokens):
        context = ids[-seq_length:]
        tokens = torch.tensor([context], dtype=torch.long, device=device)
        positions = torch.arange(len(context), dtype=torch.long, device=device).unsqueeze(0)
        logits = model(tokens, positions)
        if mpu.get_tensor_model_parallel_world_size() > 1:
            logits = mpu.gather_from_tensor_model_parallel_region(logits)
        last = logits[0, -1, :tokenizer.vocab_size].float().cpu()
        if top_k <= 1:
            next_id = int(last.argmax())
        else:
            values, indices = last.topk(min(top_k, last.numel()))
            probs = torch.softmax(values, dim=-1)
            next_id = int(indices[torch.multinomial(probs, 1, generator=gen)])
        ids.append(next_id)
        if next_id == tokenizer.eod:
            break
    if was_training:
        model.train()
    return tokenizer.detokenize(ids)
