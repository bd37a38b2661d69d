"""The evaluation, generation and server tools on a Llama-style checkpoint (every option on:
RoPE, RMSNorm, SwiGLU, 2 query groups, no biases, untied output layer) saved as two TP
shards and merged by the inference loader: cached generation equals uncached, the CLI
prints the library's text, perplexity equals a direct computation, the server answers
(its Hugging Face export: tests/test_hf_llama.py)."""
import http.client
import json
import math
import threading

import pytest
import torch

from tests.helpers.bpe_checkpoint import PROMPT, corpus_text, make_bpe_checkpoint
from tests.helpers.model import LLAMA_OPTIONS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from megatron.inference.loader import load_inference_model
    root = str(tmp_path_factory.mktemp("llama") / "ckpt")
    ref = make_bpe_checkpoint(root, tp=2, model_options=LLAMA_OPTIONS)
    im = load_inference_model(root, device=torch.device("cpu"))
    return root, im, ref


def test_loader_merges_the_shards_into_the_trained_model(checkpoint):
    _, im, ref = checkpoint
    assert set(im.model.state_dict()) == set(ref.state_dict())
    assert "output_layer.weight" in ref.state_dict()
    for name, t in ref.state_dict().items():
        assert torch.equal(im.model.state_dict()[name], t), name
    ids = torch.tensor([im.tokenizer.tokenize(PROMPT)])
    with torch.no_grad():
        torch.testing.assert_close(im.logits(ids), ref(ids)[..., :im.vocab_size], rtol=0, atol=0)


def test_generation_cached_equals_uncached_and_cli(checkpoint, capsys):
    import tools.generate as cli
    from megatron.inference.generation import generate, generate_tokens
    root, im, _ = checkpoint
    prompt = im.tokenizer.tokenize(PROMPT)
    for kw in (dict(greedy=True), dict(temperature=0.9, top_k=50, seed=7)):
        cached, lp_c = generate_tokens(im, prompt, 12, use_cache=True, stop_at_eod=False,
                                       return_logprobs=True, **kw)
        plain, lp_p = generate_tokens(im, prompt, 12, use_cache=False, stop_at_eod=False,
                                      return_logprobs=True, **kw)
        assert cached == plain and len(cached) == len(prompt) + 12, kw
        assert max(abs(a - b) for a, b in zip(lp_c, lp_p)) < 1e-4, kw
    expected, _ = generate(im, PROMPT, 10, greedy=True)
    assert cli.main(["--load", root, "--prompt", PROMPT, "--max-new-tokens", "10",
                     "--greedy", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_wikitext_perplexity_equals_direct_computation(checkpoint, tmp_path, capsys):
    import tools.evaluate as cli
    root, im, _ = checkpoint
    text = corpus_text(1)[:180]
    path = tmp_path / "wiki.txt"
    path.write_text(text)
    assert cli.main(["--load", root, "--task", "wikitext", "--data", str(path),
                     "--overlapping-eval", "48", "--no-detokenize", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tokens = im.tokenizer.tokenize(text)
    assert len(tokens) <= im.cfg.model.seq_length  # one window: every target sees its prefix
    with torch.no_grad():
        logp = torch.log_softmax(im.logits(torch.tensor([tokens]))[0].double(), -1)
    total = -sum(float(logp[j - 1, tokens[j]]) for j in range(1, len(tokens)))
    assert result["ppl"] == pytest.approx(math.exp(total / (len(tokens) - 1)), rel=1e-6)


def test_server_answers_with_the_library_text(checkpoint):
    from megatron.inference.generation import generate_tokens
    from megatron.inference.server import ServerLimits, make_server
    _, im, _ = checkpoint
    srv = make_server(im, "127.0.0.1", 0, ServerLimits(max_prompts=2, max_prompt_tokens=20,
                                                       max_tokens_to_generate=8,
                                                       max_body_bytes=4096, socket_timeout_s=5.0))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
        conn.request("PUT", "/api", body=json.dumps({"prompts": [PROMPT], "tokens_to_generate": 8,
                                                     "top_k": 1}).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        status, out = resp.status, json.loads(resp.read())
        conn.close()
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)
    tokens, _ = generate_tokens(im, im.tokenizer.tokenize(PROMPT), 8, greedy=True)
    assert status == 200 and out["text"] == [im.tokenizer.detokenize(tokens)], out
