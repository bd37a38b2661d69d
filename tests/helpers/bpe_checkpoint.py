"""A small trained GPT-2 BPE checkpoint on the embedded corpus, at any TP x PP layout."""
import gzip
import json
import os

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT = "In the beginning God created"


def tiny_bpe_config(seed=1234, seq_length=48, model_options=None):
    """A 2-layer GPT on the embedded corpus's BPE tokenizer (8192 ids); ``model_options``:
    extra ``model`` fields (e.g. tests.helpers.model.LLAMA_OPTIONS)."""
    from megatron.config import Config
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 2, 32, 4, seq_length
    for key, value in (model_options or {}).items():
        setattr(m, key, value)
    m.hidden_dropout = m.attention_dropout = 0.0
    cfg.tokenizer.type = "GPT2BPETokenizer"
    cfg.tokenizer.vocab_file = os.path.join(REPO, "data", "kjv-vocab.json")
    cfg.tokenizer.merge_file = os.path.join(REPO, "data", "kjv-merges.txt")
    cfg.training.seed = seed
    cfg.training.device = "cpu"
    return cfg


def corpus_text(num_docs=40):
    """The first documents of the embedded corpus."""
    texts = []
    with gzip.open(os.path.join(REPO, "data", "kjv.jsonl.gz"), "rt", encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == num_docs:
                break
    return "\n".join(texts)


def make_bpe_checkpoint(root, steps=12, seed=1234, tp=1, pp=1, model_options=None):
    """Train the tiny model a few Adam steps on the corpus and save it at TP x PP.

    Returns the trained TP=1 model (eval mode) for reference computations.
    """
    from megatron.checkpoint import build_rank_files, write_checkpoint
    from megatron.model import GPTModel
    from megatron.tokenizer import build_tokenizer, padded_vocab_size
    cfg = tiny_bpe_config(seed, model_options=model_options)
    tok = build_tokenizer(cfg.tokenizer)
    model = GPTModel(cfg, padded_vocab_size(tok.vocab_size, 128, 1), vocab_size=tok.vocab_size)
    ids = torch.tensor(tok.tokenize(corpus_text()))
    seq = cfg.model.seq_length
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq - 1, (8,), generator=g)
        batch = torch.stack([ids[s:s + seq + 1] for s in starts])
        loss = model(batch[:, :-1], labels=batch[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    files = build_rank_files(cfg.to_dict(), steps, steps * 8, full, tp, pp)
    write_checkpoint(root, steps, files, pp)
    return model
