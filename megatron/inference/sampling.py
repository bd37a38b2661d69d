"""Next-token choice from logits: greedy, temperature, top-k, top-p (nucleus)."""
import torch

from megatron.errors import UserError


class GenerationError(UserError, ValueError):
    """Generation settings the model cannot honour (a sampling value out of range, more
    tokens than its positions); one line naming the values."""


def check_sampling_args(greedy, temperature, top_k, top_p):
    """Raise GenerationError (one line) for out-of-range sampling settings."""
    if not greedy:
        if not (temperature > 0.0):
            raise GenerationError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise GenerationError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not (0.0 <= top_p <= 1.0):
        raise GenerationError(f"top_p must be in [0, 1] (0 = off), got {top_p}")


def filter_logits(logits, top_k=0, top_p=0.0):
    """Set to -inf every logit outside the top ``top_k`` and outside the smallest set
    whose probability reaches ``top_p`` (0 turns a filter off); ``logits``: [V] fp32."""
    logits = logits.clone()
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits[logits < kth] = float("-inf")
    if top_p and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p,
        # so the most likely token always stays.
        before = torch.cumsum(probs, dim=-1) - probs
        drop = before >= top_p
        logits[order[drop]] = float("-inf")
    return logits


def sample_next(logits, greedy=False, temperature=1.0, top_k=0, top_p=0.0, generator=None):
    """The next token id from ``logits`` [V] (fp32, CPU)."""
    if greedy:
        return int(torch.argmax(logits))
    logits = filter_logits(logits / float(temperature), top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
