"""Hugging Face GPT-2 export / import: logits equal ours, greedy text equal, round trip, errors."""
import os

import pytest
import torch

from tests.helpers.bpe_checkpoint import PROMPT, make_bpe_checkpoint

transformers = pytest.importorskip("transformers")


def _our_logits(model, tokens, vocab):
    with torch.no_grad():
        return model(tokens)[..., :vocab].float()


def _hf_logits(hf_model, tokens):
    with torch.no_grad():
        return hf_model(tokens).logits.float()


def test_export_tp2_checkpoint_matches_transformers(tmp_path):
    from megatron.checkpoint import export_to_hf
    from megatron.inference.generation import generate_tokens
    from megatron.inference.loader import load_inference_model
    ckpt = str(tmp_path / "ckpt_tp2")
    ref = make_bpe_checkpoint(ckpt, tp=2)  # the trained model, stored as two TP shards
    assert sorted(os.listdir(os.path.join(ckpt, "iter_0000012"))) == ["manifest.json", "mp_rank_00",
                                                                      "mp_rank_01"]
    hf_dir = str(tmp_path / "hf")
    export_to_hf(ckpt, hf_dir, log=lambda *_: None)
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= set(os.listdir(hf_dir))
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    assert hf.config.vocab_size == 8192 and hf.config.activation_function == "gelu_new"
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 8192, (2, 40), generator=g)
    ours = _our_logits(ref, tokens, 8192)
    theirs = _hf_logits(hf, tokens)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-4

    # The exported tokenizer encodes as ours, and greedy text is the same in transformers.
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    im = load_inference_model(ckpt, device=torch.device("cpu"))
    prompt = im.tokenizer.tokenize(PROMPT)
    assert hf_tok(PROMPT)["input_ids"] == prompt
    ours_greedy, _ = generate_tokens(im, prompt, 16, greedy=True)
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                      pad_token_id=im.tokenizer.eod)
    assert out[0].tolist() == ours_greedy
    assert hf_tok.decode(out[0][len(prompt):]) == im.tokenizer.detokenize(ours_greedy[len(prompt):])

    # Importing the export back gives the same model.
    back = str(tmp_path / "back")
    from megatron.checkpoint import import_from_hf
    import_from_hf(hf_dir, back, tp=2, log=lambda *_: None)
    im2 = load_inference_model(back, device=torch.device("cpu"))
    assert im2.tokenizer.tokenize(PROMPT) == prompt
    assert (im2.logits(tokens) - theirs).abs().max() < 1e-4


def test_import_random_transformers_gpt2(tmp_path):
    from megatron.inference.loader import load_inference_model
    import tools.convert_hf as cli
    cfg = transformers.GPT2Config(vocab_size=500, n_positions=64, n_embd=48, n_layer=3, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # make biases and norms non-trivial so the mapping is exercised
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf_dir = str(tmp_path / "hf_random")
    hf.save_pretrained(hf_dir)
    ckpt = str(tmp_path / "imported")
    assert cli.main(["import", "--hf-dir", hf_dir, "--save-dir", ckpt]) == 0
    im = load_inference_model(ckpt, device=torch.device("cpu"))
    assert im.cfg.model.num_layers == 3 and im.vocab_size == 500
    assert im.model.embedding.word_embeddings.weight.shape[0] == 512  # re-padded
    tokens = torch.randint(0, 500, (2, 64), generator=torch.Generator().manual_seed(1))
    assert (im.logits(tokens) - _hf_logits(hf, tokens)).abs().max() < 1e-4

    # user errors: one line, exit status 1
    assert cli.main(["import", "--hf-dir", str(tmp_path), "--save-dir", ckpt + "2"]) == 1
    assert cli.main(["export", "--load-dir", str(tmp_path / "none"), "--save-dir", ckpt + "3"]) == 1
