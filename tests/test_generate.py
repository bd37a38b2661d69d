"""Generation: key-value cached == uncached token for token (greedy and seeded sampling),
the sampling filters, the tools/generate.py CLI. (TP=4 generation from a TP=2 x PP=2
checkpoint is checked in test_checkpoint_convert's launch.)"""
import pytest
import torch

from tests.helpers.bpe_checkpoint import PROMPT, make_bpe_checkpoint


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
