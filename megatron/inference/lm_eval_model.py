"""The lm-evaluation-harness model ``megatron-gpt``: evaluate a checkpoint of any layout.

    python -m megatron.inference.lm_eval_model --model megatron-gpt \\
        --model_args load=checkpoints/gpt2_345m --tasks lambada_openai,hellaswag --batch_size 16

takes lm_eval's own command line (``megatron-lm-eval`` is the same command once
``pip install -e .[eval]`` is done). lm_eval 0.4 finds models only in its own
registry and has no plugin entry point, so ``python -m lm_eval`` cannot see this
one: the command above registers it, then runs lm_eval's CLI. From Python,
``import megatron.inference.lm_eval_model`` registers it for
``lm_eval.simple_evaluate(model="megatron-gpt", model_args="load=...")``.

``--model_args``: ``load`` (checkpoint directory, any TP / PP layout: the shards are
merged as the inference tools merge them), ``iteration`` (default: the latest),
``dtype`` (fp32 / fp16 / bf16; default fp32 on CPU, the checkpoint's precision on
GPU), ``max_length`` (default: the model's positions), ``max_gen_toks`` (256).
``--device`` and ``--batch_size`` are lm_eval's (``auto`` means 16). One process.

Scoring follows lm_eval's ``hf`` model, so the two give the same numbers for the same
weights: context and continuation are tokenized together, inputs longer than the
model are cut from the left, rolling log-likelihoods use lm_eval's disjoint windows,
and requests are scored in batches of similar length (right-padded: the model is
causal, so padding never changes the scored positions). Generation is greedy unless
``do_sample`` is set, batches prompts of equal token length, and stops at any
``until`` string or the end-of-document token.
"""
import sys

import torch

from megatron.optional_deps import require

lm_eval = require("lm_eval", "eval", "the lm-evaluation-harness model megatron-gpt")
# lm_eval fills its registry with its own models only while the registry is empty:
# list them first, or registering megatron-gpt would hide "hf", "vllm", ...
import lm_eval.models  # noqa: E402,F401
from lm_eval.api.model import TemplateLM  # noqa: E402  (after the one-line check above)
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from megatron.errors import UserError  # noqa: E402
from megatron.inference.sampling import check_sampling_args, sample_next  # noqa: E402
from megatron.model.inference_params import InferenceParams  # noqa: E402

NAME = "megatron-gpt"
AUTO_BATCH_SIZE = 16
DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16",
               "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


class LmEvalArgumentError(UserError, ValueError):
    """A --model_args value the model cannot use; one line naming it."""


def _batch_size(value):
    if value is None or str(value).startswith("auto"):
        return AUTO_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise LmEvalArgumentError(f"batch_size must be a positive integer or auto, got {value!r}") from None
    if size < 1:
        raise LmEvalArgumentError(f"batch_size must be a positive integer or auto, got {value!r}")
    return size


@register_model(NAME)
class MegatronGPTLM(TemplateLM):
    """lm_eval's ``LM`` over a megatron.inference ``InferenceModel``."""

    def __init__(self, load=None, iteration=None, dtype=None, device=None, batch_size=1,
                 max_batch_size=None, max_length=None, max_gen_toks=256, **unused):
        super().__init__()
        if unused:
            raise LmEvalArgumentError(f"unknown --model_args {', '.join(sorted(unused))} for {NAME} "
                                      "(it takes load, iteration, dtype, max_length, max_gen_toks)")
        if not load:
            raise LmEvalArgumentError(f"--model_args needs load=CHECKPOINT_DIR ({NAME})")
        from megatron.inference.loader import load_inference_model
        from megatron.initialize import select_device
        dev = torch.device(device) if device else select_device("auto")
        if dev.type == "cuda" and not torch.cuda.is_available():
            # lm_eval's CLI asks for cuda:0 unless told otherwise; its hf model falls back too.
            print(f"warning: {NAME}: device {device} requested but CUDA is not available; using the CPU",
                  file=sys.stderr, flush=True)
            dev = torch.device("cpu")
        if dtype is not None:
            if dtype not in DTYPE_NAMES:
                raise LmEvalArgumentError(f"dtype must be one of fp32, fp16, bf16 (or float32, float16, "
                                          f"bfloat16), got {dtype!r}")
            dtype = DTYPE_NAMES[dtype]
        self._im = load_inference_model(str(load), device=dev, dtype=dtype,
                                        iteration=int(iteration) if iteration is not None else None)
        self.tokenizer = self._im.tokenizer
        self.batch_size = _batch_size(batch_size)
        self._max_length = int(max_length) if max_length else self._im.max_sequence_length
        if self._max_length > self._im.max_sequence_length:
            raise LmEvalArgumentError(f"max_length {self._max_length} exceeds the model's "
                                      f"{self._im.max_sequence_length} positions")
        self.max_gen_toks = int(max_gen_toks)

    # ----------------------------------------------------------- lm_eval's hooks

    @property
    def eot_token_id(self):
        """The end-of-document id: lm_eval's end of text and the context of an empty prompt."""
        return self.tokenizer.eod

    @property
    def max_length(self):
        """Tokens per forward pass."""
        return self._max_length

    @property
    def device(self):
        """Where the model runs."""
        return self._im.device

    @property
    def tokenizer_name(self):
        """A name for lm_eval's request cache: the tokenizer's type and vocabulary."""
        cfg = self._im.cfg.tokenizer
        return f"{cfg.type}-{self.tokenizer.vocab_size}"

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        """The tokenizer's ids of ``string`` (no special tokens are added, as GPT-2's)."""
        return self.tokenizer.tokenize(string)

    def tok_decode(self, tokens, **kwargs):
        """The text of ``tokens``."""
        return self.tokenizer.detokenize(list(tokens))

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def _logprobs(self, inputs):
        """log-softmax over the vocabulary of right-padded ``inputs`` (lists of ids): [b, s, V] fp32."""
        width = max(len(x) for x in inputs)
        batch = torch.full((len(inputs), width), self.eot_token_id, dtype=torch.long)
        for row, ids in enumerate(inputs):
            batch[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return torch.log_softmax(self._im.logits(batch), dim=-1).cpu()

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """``(sum of log p(continuation), continuation is greedy)`` per (key, context ids,
        continuation ids) request, in the order given; longest first in batches."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            inputs, continuations = [], []
            for i in chunk:
                _, context, continuation = requests[i]
                if not 0 < len(continuation) <= self.max_length:
                    raise LmEvalArgumentError(f"a continuation of {len(continuation)} tokens cannot be "
                                              f"scored by a model of {self.max_length} positions")
                # The last max_length + 1 tokens: each input token predicts the next one.
                inputs.append((list(context) + list(continuation))[-(self.max_length + 1):][:-1])
                continuations.append(continuation)
            logprobs = self._logprobs(inputs)
            for row, i in enumerate(chunk):
                length, continuation = len(inputs[row]), continuations[row]
                lp = logprobs[row, length - len(continuation):length]
                target = torch.tensor(continuation, dtype=torch.long)
                greedy = bool((lp.argmax(dim=-1) == target).all())
                results[i] = (float(lp.gather(1, target.unsqueeze(1)).sum()), greedy)
                key = requests[i][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Log-likelihood of each whole text, scored in lm_eval's disjoint rolling windows
        (each token predicted once, with up to max_length - 1 tokens of context)."""
        windows, owner = [], []
        for n, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[n] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # --------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm=False):
        """Continue each context until one of its ``until`` strings, the end-of-document
        token or ``max_gen_toks`` tokens; the text before the first ``until`` string."""
        jobs = []
        for n, request in enumerate(requests):
            context, gen_kwargs = request.args
            jobs.append((n, self._generation_job(context, dict(gen_kwargs or {}))))
        # Prompts of equal length and settings share a batch: no padding needed.
        jobs.sort(key=lambda j: (len(j[1]["context"]), repr(j[1]["settings"])))
        results = [None] * len(requests)
        i = 0
        while i < len(jobs):
            group = [jobs[i]]
            while (i + len(group) < len(jobs) and len(group) < self.batch_size
                   and len(jobs[i + len(group)][1]["context"]) == len(jobs[i][1]["context"])
                   and jobs[i + len(group)][1]["settings"] == jobs[i][1]["settings"]):
                group.append(jobs[i + len(group)])
            for (n, job), text in zip(group, self._generate_batch([job for _, job in group])):
                results[n] = text
                self.cache_hook.add_partial("generate_until", requests[n].args, text)
            i += len(group)
        return results

    def _generation_job(self, context, gen_kwargs):
        until = gen_kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        eot_text = self.tok_decode([self.eot_token_id])
        until = list(until) + ([eot_text] if eot_text and eot_text not in until else [])
        max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(gen_kwargs.pop("do_sample", False))
        temperature = float(gen_kwargs.pop("temperature", 0.0) or 0.0)
        greedy = not do_sample or temperature == 0.0
        settings = (greedy, temperature or 1.0, int(gen_kwargs.pop("top_k", 0) or 0),
                    float(gen_kwargs.pop("top_p", 0.0) or 0.0))
        check_sampling_args(*settings)
        # Keep the prompt's end; leave room for the new tokens within the model's positions.
        ids = self.tok_encode(context) or [self.eot_token_id]
        keep = max(self.max_length - max_new, 1)
        ids = ids[-keep:]
        max_new = min(max_new, self.max_length - len(ids))
        return {"context": ids, "until": until, "max_new": max_new, "settings": settings}

    @torch.no_grad()
    def _generate_batch(self, jobs):
        """Decode a batch of equal-length prompts with one key-value cache."""
        greedy, temperature, top_k, top_p = jobs[0]["settings"]
        length = len(jobs[0]["context"])
        steps = max(job["max_new"] for job in jobs)
        out = [[] for _ in jobs]
        done = [job["max_new"] <= 0 for job in jobs]
        cache = InferenceParams(len(jobs), length + max(steps, 1))
        logits = self._im.logits(torch.tensor([job["context"] for job in jobs], dtype=torch.long), cache)
        cache.advance(length)
        for _ in range(steps):
            nxt = [sample_next(logits[b, -1].cpu(), greedy, temperature, top_k, top_p) for b in range(len(jobs))]
            for b, job in enumerate(jobs):
                if done[b]:
                    continue
                if nxt[b] == self.eot_token_id:
                    done[b] = True
                    continue
                out[b].append(nxt[b])
                if len(out[b]) >= job["max_new"] or any(u in self.tok_decode(out[b]) for u in job["until"]):
                    done[b] = True
            if all(done):
                break
            logits = self._im.logits(torch.tensor([[t] for t in nxt], dtype=torch.long), cache)
            cache.advance(1)
        texts = []
        for b, job in enumerate(jobs):
            text = self.tok_decode(out[b])
            for u in job["until"]:
                if u:
                    text = text.split(u)[0]
            texts.append(text)
        return texts


def main(argv=None):
    """lm_eval's command line with ``megatron-gpt`` registered (see the module doc)."""
    from lm_eval.__main__ import cli_evaluate
    from megatron.cli import run

    def body(args):
        sys.argv = ["lm-eval", *(sys.argv[1:] if args is None else args)]
        cli_evaluate()

    return run(body, argv)


if __name__ == "__main__":
    sys.exit(main())
