"""The Megatron-LM paper's zero-shot evaluations: WikiText perplexity and LAMBADA accuracy.

WikiText: the token stream is scored in windows of the model's sequence length
that slide by ``overlapping_eval`` tokens; the first window scores all its
targets, each later one only the targets no earlier window scored, so every
token after the first is predicted exactly once, with up to
``seq_length - overlapping_eval`` tokens of context before it. The raw
perplexity is exp(total NLL / scored BPE tokens); the adjusted one divides
the same NLL by the number of word-level tokens of the original text (minus
one, as the first is never predicted), which makes perplexities comparable
across tokenizers (the paper's token ratio).

LAMBADA: predict the last word of each passage. ``strict``: the passage is cut
before its last word, which is tokenized on its own, and every subword of it
must be the greedy prediction; otherwise only the last token of the
tokenized passage is predicted.
"""
import json
import re

import torch

from megatron.errors import UserError
from megatron.utils import perplexity


class EvaluationError(UserError, ValueError):
    """Evaluation input that cannot be scored (a bad data line, too short a text, an
    out-of-range window step); one line naming the values."""


def wikitext_detokenize(text):
    """Undo WikiText's tokenization artifacts (" @-@ ", " , ", spaced brackets, ...)."""
    s = text.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    s = s.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".")
    s = s.replace(" : ", ": ").replace(" ; ", "; ").replace(" . ", ". ")
    s = s.replace(" ! ", "! ").replace(" ? ", "? ").replace(" , ", ", ")
    s = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", s)
    s = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", s)
    s = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    s = s.replace("= = = =", "====").replace("= = =", "===").replace("= =", "==")
    s = s.replace(" " + chr(176) + " ", chr(176)).replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ").replace(" 's", "'s")
    return s


def sliding_windows(num_tokens, seq_length, overlapping_eval):
    """[(start, first_scored_target, end_target)] covering targets 1..num_tokens-1 once each.

    Window i holds tokens [start, start + seq_length] (inputs and shifted
    targets); target j is the token at position j.
    """
    if overlapping_eval < 1 or overlapping_eval > seq_length:
        raise EvaluationError(f"overlapping_eval must be in [1, seq_length={seq_length}], "
                              f"got {overlapping_eval}")
    windows, scored, start = [], 0, 0
    while scored < num_tokens - 1:
        end = min(start + seq_length, num_tokens - 1)
        if end > scored:
            windows.append((start, scored + 1, end))
            scored = end
        start += overlapping_eval
    return windows


@torch.no_grad()
def _target_nll(im, tokens):
    """NLL (fp64, CPU) of tokens[1:] given the prefix, one forward of ``tokens``."""
    ids = torch.tensor([tokens], dtype=torch.long)
    logits = im.logits(ids[:, :-1])[0].double().cpu()
    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)


def evaluate_wikitext(im, text, overlapping_eval=32, detokenize=True, progress=None):
    """Perplexity of ``text`` by the paper's method; a dict of results and counts."""
    num_original = len(text.split())
    if detokenize:
        text = wikitext_detokenize(text)
    tokens = im.tokenizer.tokenize(text)
    if len(tokens) < 2:
        raise EvaluationError(f"the text has {len(tokens)} token(s); at least 2 are needed")
    seq = im.cfg.model.seq_length
    windows = sliding_windows(len(tokens), seq, overlapping_eval)
    total = 0.0
    for start, first, end in (progress(windows) if progress else windows):
        nll = _target_nll(im, tokens[start:end + 1])
        total += float(nll[first - start - 1:].sum())
    scored = len(tokens) - 1
    words = max(num_original - 1, 1)
    return {"task": "wikitext", "ppl": perplexity(total / scored),
            "adjusted_ppl": perplexity(total / words), "total_nll": total,
            "num_tokenized_tokens": len(tokens), "num_original_tokens": num_original,
            "token_ratio": scored / words, "num_windows": len(windows),
            "overlapping_eval": overlapping_eval}


def lambada_example(tokenizer, text, strict):
    """(tokens, number of final tokens to predict) for one LAMBADA passage."""
    text = text.strip()
    if not text:
        raise EvaluationError("empty LAMBADA passage")
    if strict:
        last_word = text.split()[-1]
        context = text[:text.rfind(last_word)].strip()
        head = tokenizer.tokenize(context)
        tail = tokenizer.tokenize(" " + last_word)
        return head + tail, len(tail)
    return tokenizer.tokenize(text), 1


@torch.no_grad()
def evaluate_lambada(im, texts, strict=False, progress=None):
    """Cloze accuracy over ``texts``: an example counts when every target token is the argmax."""
    seq = im.cfg.model.seq_length
    correct = 0
    for text in (progress(texts) if progress else texts):
        tokens, n = lambada_example(im.tokenizer, text, strict)
        if len(tokens) < n + 1:
            raise EvaluationError(f"LAMBADA passage too short to predict its last word: {text!r}")
        tokens = tokens[-(seq + 1):]  # the model sees at most seq_length inputs
        logits = im.logits(torch.tensor([tokens[:-1]], dtype=torch.long))[0]
        pred = logits[-n:].argmax(dim=-1).cpu().tolist()
        correct += int(pred == tokens[-n:])
    total = len(texts)
    return {"task": "lambada", "accuracy": correct / total if total else float("nan"),
            "num_correct": correct, "num_examples": total, "strict": bool(strict)}


def read_lambada(path):
    """The ``text`` of each line of a LAMBADA-style JSONL file (EvaluationError names the bad line)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvaluationError(f"{path}:{i}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise EvaluationError(f"{path}:{i}: expected an object with a string \"text\"")
            texts.append(obj["text"])
    if not texts:
        raise EvaluationError(f"{path} holds no examples")
    return texts
