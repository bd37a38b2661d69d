"""Autoregressive generation with an optional key-value cache.

Prompts are generated one at a time (batch 1), so prompts of different
lengths need no padding. Under tensor parallelism every rank computes the same
gathered logits and draws from an identically seeded generator, so all ranks
pick the same tokens without further communication.
"""
import torch

from megatron import mpu
from megatron.inference.sampling import GenerationError, check_sampling_args, sample_next
from megatron.model.inference_params import InferenceParams


def _shared_random_seed(im):
    """A fresh random seed, the same on every tensor-parallel rank.

    Each rank's own ``torch.seed()`` would differ, the ranks would sample
    different tokens and their key-value caches (each holding other heads)
    would then describe different sequences.
    """
    seed = torch.seed() % (2 ** 63)
    if mpu.get_tensor_model_parallel_world_size() == 1:
        return seed
    t = torch.tensor([seed], dtype=torch.int64, device=im.device)
    mpu.broadcast(t, src=mpu.get_tensor_model_parallel_src_rank(),
                  group=mpu.get_tensor_model_parallel_group())
    return int(t.item())


@torch.no_grad()
def generate_tokens(im, prompt_tokens, tokens_to_generate, greedy=False, temperature=1.0,
                    top_k=0, top_p=0.0, seed=None, use_cache=True, stop_at_eod=True,
                    return_logprobs=False):
    """Continue ``prompt_tokens`` (list of int) by up to ``tokens_to_generate`` tokens.

    ``im`` is a megatron.inference.loader.InferenceModel. Returns
    ``(tokens, logprobs)``: all tokens (prompt + generated) and, with
    ``return_logprobs``, the log probability of each token after the first
    under the model (else None). Stops early at the end-of-document token when
    ``stop_at_eod``. Raises GenerationError (a ValueError) when the total length
    exceeds the model's positions or a setting is out of range.
    """
    check_sampling_args(greedy, temperature, top_k, top_p)
    if tokens_to_generate < 0:
        raise GenerationError(f"tokens_to_generate must be >= 0, got {tokens_to_generate}")
    tokens = list(prompt_tokens) or [im.tokenizer.eod]
    total = len(tokens) + tokens_to_generate
    if total > im.max_sequence_length:
        raise GenerationError(f"prompt of {len(tokens)} tokens + {tokens_to_generate} new tokens = "
                              f"{total} exceeds the model's {im.max_sequence_length} positions")
    generator = None
    if not greedy:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(int(seed) if seed is not None else _shared_random_seed(im))
    eod = im.tokenizer.eod
    logprobs = []
    cache = InferenceParams(1, total) if use_cache else None

    def step_logits(new_tokens):
        if cache is not None:
            logits = im.logits(torch.tensor([new_tokens], dtype=torch.long), cache)
            cache.advance(len(new_tokens))
        else:
            logits = im.logits(torch.tensor([tokens], dtype=torch.long))
        return logits[0].cpu()

    logits = step_logits(tokens)
    if return_logprobs and len(tokens) > 1:
        lp = torch.log_softmax(logits[:-1], dim=-1)
        logprobs.extend(lp.gather(1, torch.tensor(tokens[1:]).unsqueeze(1)).squeeze(1).tolist())
    for i in range(tokens_to_generate):
        last = logits[-1]
        nxt = sample_next(last, greedy, temperature, top_k, top_p, generator)
        if return_logprobs:
            logprobs.append(float(torch.log_softmax(last, dim=-1)[nxt]))
        tokens.append(nxt)
        if (stop_at_eod and nxt == eod) or i == tokens_to_generate - 1:
            break
        logits = step_logits([nxt])
    return tokens, (logprobs if return_logprobs else None)


def generate(im, prompt, tokens_to_generate, **kwargs):
    """Text of ``prompt`` continued: returns ``(continuation_text, new_token_ids)``."""
    prompt_ids = im.tokenizer.tokenize(prompt)
    tokens, _ = generate_tokens(im, prompt_ids, tokens_to_generate, **kwargs)
    new = tokens[len(prompt_ids) if prompt_ids else 1:]
    return im.tokenizer.detokenize([t for t in new if t != im.tokenizer.eod]), new
