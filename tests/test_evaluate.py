"""WikiText perplexity and LAMBADA accuracy (tools/evaluate.py) against direct computations."""
import json
import math

import pytest
import torch

from tests.helpers.bpe_checkpoint import corpus_text, make_bpe_checkpoint


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from megatron.inference.loader import load_inference_model
    root = str(tmp_path_factory.mktemp("eval") / "ckpt")
    make_bpe_checkpoint(root, tp=2)  # evaluated from a TP=2 checkpoint, merged in memory
    return root, load_inference_model(root, device=torch.device("cpu"))


def _nll_of(im, context, target):
    with torch.no_grad():
        logits = im.model(torch.tensor([context]))[0, -1, :im.vocab_size].double()
    return -float(torch.log_softmax(logits, -1)[target])


def _direct_wikitext(im, text, ov):
    """Each target j predicted from the window the paper's method gives it, one forward each."""
    tokens = im.tokenizer.tokenize(text)
    seq = im.cfg.model.seq_length
    total = 0.0
    for j in range(1, len(tokens)):
        start = 0 if j <= seq else math.ceil((j - seq) / ov) * ov
        total += _nll_of(im, tokens[start:j], tokens[j])
    return total, len(tokens), len(text.split())


@pytest.mark.parametrize("ov", [7, 48])
def test_wikitext_equals_direct_computation(loaded, tmp_path, capsys, ov):
    import tools.evaluate as cli
    root, im = loaded
    text = corpus_text(6)[:1500]
    path = tmp_path / "wiki.txt"
    path.write_text(text)
    assert cli.main(["--load", root, "--task", "wikitext", "--data", str(path),
                     "--overlapping-eval", str(ov), "--no-detokenize", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    total, n_tokens, n_words = _direct_wikitext(im, text, ov)
    assert n_tokens > 3 * im.cfg.model.seq_length  # several windows
    assert result["num_tokenized_tokens"] == n_tokens and result["num_original_tokens"] == n_words
    assert result["ppl"] == pytest.approx(math.exp(total / (n_tokens - 1)), rel=1e-6)
    assert result["adjusted_ppl"] == pytest.approx(math.exp(total / (n_words - 1)), rel=1e-6)


def test_wikitext_detokenizer_and_window_errors():
    from megatron.inference.evaluation import sliding_windows, wikitext_detokenize
    assert wikitext_detokenize("a @-@ b , c ( d ) 1 @,@ 000") == "a-b, c (d) 1,000"
    # every target exactly once, whatever the stride
    for n, seq, ov in [(10, 4, 1), (100, 16, 5), (17, 16, 16), (5, 16, 3)]:
        covered = [j for _, first, end in sliding_windows(n, seq, ov) for j in range(first, end + 1)]
        assert covered == list(range(1, n))
    with pytest.raises(ValueError, match="overlapping_eval"):
        sliding_windows(10, 4, 5)


def _lambada_texts(im):
    """Passages whose last word is the model's own greedy continuation, and some that are not."""
    from megatron.inference.generation import generate_tokens
    texts = []
    for prompt in ["And the LORD said unto Moses", "In the beginning God", "And it came to pass",
                   "Blessed are the"]:
        tokens, _ = generate_tokens(im, im.tokenizer.tokenize(prompt), 6, greedy=True,
                                    stop_at_eod=False)
        texts.append(im.tokenizer.detokenize(tokens))
        texts.append(prompt + " elephant")
    return texts


def _direct_lambada(im, texts, strict):
    correct = 0
    for text in texts:
        if strict:
            word = text.split()[-1]
            head = im.tokenizer.tokenize(text[:text.rfind(word)].strip())
            tail = im.tokenizer.tokenize(" " + word)
        else:
            ids = im.tokenizer.tokenize(text)
            head, tail = ids[:-1], ids[-1:]
        ok = True
        ctx = list(head)
        for t in tail:  # teacher forcing: each subword predicted from the true prefix
            with torch.no_grad():
                logits = im.model(torch.tensor([ctx]))[0, -1, :im.vocab_size]
            ok = ok and int(logits.argmax()) == t
            ctx.append(t)
        correct += ok
    return correct


@pytest.mark.parametrize("strict", [False, True])
def test_lambada_equals_direct_computation(loaded, tmp_path, capsys, strict):
    import tools.evaluate as cli
    root, im = loaded
    texts = _lambada_texts(im)
    path = tmp_path / "lambada.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    args = ["--load", root, "--task", "lambada", "--data", str(path), "--device", "cpu"]
    assert cli.main(args + (["--strict"] if strict else [])) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = _direct_lambada(im, texts, strict)
    assert 0 < expected < len(texts)  # the check can tell right from wrong
    assert result["num_examples"] == len(texts) and result["num_correct"] == expected
    assert result["accuracy"] == pytest.approx(expected / len(texts))


def test_evaluate_user_errors(loaded, tmp_path, capsys):
    import tools.evaluate as cli
    root, _ = loaded
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b"}\nnot json\n')
    assert cli.main(["--load", root, "--task", "lambada", "--data", str(bad), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "bad.jsonl:2" in err and err.count("\n") == 1
    assert cli.main(["--load", root, "--task", "wikitext", "--data", str(tmp_path / "none"),
                     "--device", "cpu"]) == 1
    assert "does not exist" in capsys.readouterr().err
