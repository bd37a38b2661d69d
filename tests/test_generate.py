"""Generation: key-value cached == uncached token for token (greedy and seeded sampling),
the sampling filters, the tools/generate.py CLI. (TP=4 generation from a TP=2 x PP=2
checkpoint is checked in test_checkpoint_convert's launch.)

Also holds ``make_bpe_checkpoint``, the small trained GPT-2 BPE checkpoint the
evaluation, Hugging Face and server tests share.
"""
import gzip
import json
import os

import pytest
import torch


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "In the beginning God created"


def tiny_bpe_config(seed=1234, seq_length=48):
    """A 2-layer GPT on the embedded corpus's BPE tokenizer (8192 ids)."""
    from megatron.config import Config
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads, m.seq_length = 2, 32, 4, seq_length
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


def make_bpe_checkpoint(root, steps=12, seed=1234, tp=1, pp=1):
    """Train the tiny model a few Adam steps on the corpus and save it at TP x PP.

    Returns the trained TP=1 model (eval mode) for reference computations.
    """
    from megatron.checkpoint import build_rank_files, write_checkpoint
    from megatron.model import GPTModel
    from megatron.tokenizer import build_tokenizer, padded_vocab_size
    cfg = tiny_bpe_config(seed)
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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("gen") / "ckpt")
    make_bpe_checkpoint(root)
    return root


def _generations(im):
    from megatron.inference.generation import generate_tokens
    prompt = im.tokenizer.tokenize(PROMPT)
    out = {}
    for name, kw in {"greedy": dict(greedy=True),
                     "sample": dict(temperature=0.9, top_k=50, top_p=0.95, seed=7),
                     "hot": dict(temperature=1.5, seed=3)}.items():
        cached, lp_c = generate_tokens(im, prompt, 12, use_cache=True, stop_at_eod=False,
                                       return_logprobs=True, **kw)
        plain, lp_p = generate_tokens(im, prompt, 12, use_cache=False, stop_at_eod=False,
                                      return_logprobs=True, **kw)
        out[name] = (cached, plain, lp_c, lp_p)
    return out


def test_cached_equals_uncached(checkpoint):
    from megatron.inference.loader import load_inference_model
    im = load_inference_model(checkpoint, device=torch.device("cpu"))
    gens = _generations(im)
    for name, (cached, plain, lp_c, lp_p) in gens.items():
        assert cached == plain, name
        assert len(cached) == len(im.tokenizer.tokenize(PROMPT)) + 12
        assert torch.allclose(torch.tensor(lp_c), torch.tensor(lp_p), atol=1e-4), name
    # sampling differs from greedy (the settings matter), and seeds reproduce
    assert gens["hot"][0] != gens["greedy"][0]
    again = _generations(im)
    assert again["sample"][0] == gens["sample"][0]


def test_sampling_filters():
    from megatron.inference.sampling import filter_logits, sample_next
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g)
    kept = filter_logits(logits, top_k=5)
    assert torch.isfinite(kept).sum() == 5
    assert set(torch.nonzero(torch.isfinite(kept)).flatten().tolist()) == \
        set(torch.topk(logits, 5).indices.tolist())
    # top-p: the smallest prefix of the sorted probabilities whose mass reaches p
    probs = torch.softmax(logits, -1)
    order = torch.argsort(probs, descending=True)
    csum = torch.cumsum(probs[order], 0)
    n = int((csum < 0.6).sum()) + 1
    kept = filter_logits(logits, top_p=0.6)
    assert set(torch.nonzero(torch.isfinite(kept)).flatten().tolist()) == set(order[:n].tolist())
    # top_k=1 sampling is greedy
    assert all(sample_next(logits, top_k=1, generator=g) == int(logits.argmax()) for _ in range(5))
    with pytest.raises(ValueError, match="temperature"):
        from megatron.inference.sampling import check_sampling_args
        check_sampling_args(False, 0.0, 0, 0.0)


def test_generate_cli(checkpoint, capsys):
    import tools.generate as cli
    from megatron.inference.generation import generate
    from megatron.inference.loader import load_inference_model
    im = load_inference_model(checkpoint, device=torch.device("cpu"))
    expected, _ = generate(im, PROMPT, 10, greedy=True)
    assert cli.main(["--load", checkpoint, "--prompt", PROMPT, "--max-new-tokens", "10",
                     "--greedy", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert cli.main(["--load", checkpoint + "_missing", "--prompt", "x", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert cli.main(["--load", checkpoint, "--prompt", "x", "--max-new-tokens", "500",
                     "--device", "cpu"]) == 1
    assert "positions" in capsys.readouterr().err
