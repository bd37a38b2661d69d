"""Hugging Face Llama (LlamaForCausalLM) export and import, from and to TP=2 x PP=2 layouts:
fp32 logits equal transformers' within 1e-5 both ways, greedy text equal to transformers'
``generate``, exact round trips; a SentencePiece model and a tokenizer.json through
preprocess_data.py, training, generation and export; mixed blocks refused in one line."""
import gzip
import json
import os

import pytest
import torch

from tests.helpers.bpe_checkpoint import PROMPT, REPO, corpus_text, make_bpe_checkpoint
from tests.helpers.model import LLAMA_OPTIONS
from tests.helpers.training import reset_layout

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never ask the hub


def _close(ours, theirs):
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def _tokenizer_json(path, vocab_size, docs=30):
    """A Llama 3-style byte-level BPE tokenizer.json built offline with ``tokenizers``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus_text(docs).split("\n"), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(path))
    return tok


def _greedy_hf(hf, hf_tok, prompt_ids, n, eod):
    out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False,
                      eos_token_id=eod, pad_token_id=eod)[0, len(prompt_ids):].tolist()
    return hf_tok.decode([t for t in out if t != eod])


def test_export_tp2_pp2_matches_transformers_and_imports_back(tmp_path):
    """Our trained Llama-style model (2 query groups, untied, no biases), stored as TP=2 x PP=2,
    exported: transformers' logits and greedy text equal ours; imported back at TP=2 x PP=2 it
    is the same model bit for bit."""
    from megatron.checkpoint import export_to_hf, import_from_hf
    from megatron.inference.generation import generate_tokens
    from megatron.inference.loader import load_inference_model
    ckpt, hf_dir, back = (str(tmp_path / n) for n in ("ckpt", "hf", "back"))
    ref = make_bpe_checkpoint(ckpt, tp=2, pp=2, model_options=LLAMA_OPTIONS)
    export_to_hf(ckpt, hf_dir, log=lambda *_: None)
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt",
            "tokenizer_config.json"} == set(os.listdir(hf_dir))
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    c = hf.config
    assert (c.num_key_value_heads, c.tie_word_embeddings, c.attention_bias, c.vocab_size) == \
        (2, False, False, 8192)
    tokens = torch.randint(0, 8192, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(tokens).logits
        _close(ref(tokens)[..., :8192], theirs)

    im = load_inference_model(ckpt, device=torch.device("cpu"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    prompt = im.tokenizer.tokenize(PROMPT)
    assert hf_tok(PROMPT, add_special_tokens=False)["input_ids"] == prompt
    ours, _ = generate_tokens(im, prompt, 16, greedy=True)
    eod = im.tokenizer.eod
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                      pad_token_id=eod, eos_token_id=eod)
    assert out[0].tolist() == ours

    import_from_hf(hf_dir, back, tp=2, pp=2, log=lambda *_: None)
    assert sorted(os.listdir(os.path.join(back, "iter_0000000"))) == [
        "manifest.json", "mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    im2 = load_inference_model(back, device=torch.device("cpu"))
    assert im2.cfg.model.num_query_groups == 2 and im2.cfg.model.activation == "swiglu"
    assert im2.model.state_dict().keys() == ref.state_dict().keys()
    for name, t in ref.state_dict().items():
        assert torch.equal(im2.model.state_dict()[name], t), name
    with torch.no_grad():
        _close(im2.logits(tokens), theirs)


def test_import_random_llama_then_generate_and_export_back(tmp_path, capsys):
    """A random transformers Llama (GQA, tied embeddings, attention and MLP biases, rope_theta
    500000; safetensors shards) with a tokenizer.json: imported to TP=2 x PP=2 its logits equal transformers';
    tools/generate.py prints transformers' greedy text; exporting it again gives the same
    weights."""
    import tools.convert_hf as convert
    import tools.generate as gen
    from megatron.inference.loader import load_inference_model
    from safetensors.torch import load_file
    hf_dir, ckpt, again = (str(tmp_path / n) for n in ("hf", "ckpt", "again"))
    os.makedirs(hf_dir)
    tok = _tokenizer_json(os.path.join(hf_dir, "tokenizer.json"), 320)
    eod = tok.token_to_id("<|end_of_text|>")
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-6, rope_theta=500000.0, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True, initializer_range=0.1, bos_token_id=tok.token_to_id("<|begin_of_text|>"),
        eos_token_id=eod)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # biases and norms away from their init, so the mapping is exercised
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(hf_dir, max_shard_size="100KB")  # shards listed in an index, as big models
    assert os.path.isfile(os.path.join(hf_dir, "model.safetensors.index.json"))
    with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|end_of_text|>"}, f)

    assert convert.main(["import", "--hf-dir", hf_dir, "--save-dir", ckpt,
                         "--target-tensor-parallel-size", "2",
                         "--target-pipeline-parallel-size", "2"]) == 0
    im = load_inference_model(ckpt, device=torch.device("cpu"))
    m = im.cfg.model
    assert (m.rotary_base, m.num_query_groups, m.add_bias_linear, im.tokenizer.eod) == \
        (500000, 2, True, eod)
    assert not m.untie_embeddings_and_output_weights
    tokens = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _close(im.logits(tokens), hf(tokens).logits)

    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    prompt = im.tokenizer.tokenize(PROMPT)
    assert hf_tok(PROMPT, add_special_tokens=False)["input_ids"] == prompt
    capsys.readouterr()
    assert gen.main(["--load", ckpt, "--prompt", PROMPT, "--max-new-tokens", "12", "--greedy",
                     "--device", "cpu"]) == 0
    assert capsys.readouterr().out == _greedy_hf(hf, hf_tok, prompt, 12, eod) + "\n"

    assert convert.main(["export", "--load-dir", ckpt, "--save-dir", again]) == 0
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(again))
    theirs = hf.state_dict()
    back = load_file(os.path.join(again, "model.safetensors"))
    assert back.keys() == theirs.keys() - {"lm_head.weight"}  # tied
    for name, t in back.items():
        assert torch.equal(t, theirs[name]), name
    assert transformers.AutoTokenizer.from_pretrained(again).eos_token_id == eod


def _sentencepiece_model(tmp_path, jsonl):
    import tools.train_tokenizer as train
    assert train.main(["--input", jsonl, "--type", "sentencepiece", "--vocab-size", "400",
                       "--output-prefix", str(tmp_path / "sp")]) == 0
    return str(tmp_path / "sp.model")


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "HuggingFaceTokenizer"])
def test_tokenizer_through_preprocessing_training_generation_and_export(tmp_path, capsys, kind):
    """A SentencePiece model (tools/train_tokenizer.py) or a tokenizer.json preprocesses the
    corpus, trains a tiny Llama-style model (configs/llama_tiny.yaml, shrunk), generates, and
    exports with its tokenizer: transformers' tokenizer gives our ids, its greedy text ours."""
    import pretrain_gpt
    import tools.convert_hf as convert
    import tools.generate as gen
    import tools.preprocess_data as preprocess
    jsonl = str(tmp_path / "kjv_small.jsonl")
    with gzip.open(os.path.join(REPO, "data", "kjv.jsonl.gz"), "rt") as f, open(jsonl, "w") as out:
        out.write("".join(line for _, line in zip(range(40), f)))
    if kind == "SentencePieceTokenizer":
        model_file = _sentencepiece_model(tmp_path, jsonl)
    else:
        model_file = str(tmp_path / "tokenizer.json")
        _tokenizer_json(model_file, 400)
    prefix = str(tmp_path / "kjv")
    assert preprocess.main(["--input", jsonl, "--output-prefix", prefix, "--tokenizer-type", kind,
                            "--tokenizer-model", model_file, "--append-eod", "--no-progress"]) == 0
    save = str(tmp_path / "ck")
    try:
        assert pretrain_gpt.main([
            "--config", os.path.join(REPO, "configs", "llama_tiny.yaml"),
            f"tokenizer.type={kind}", f"tokenizer.tokenizer_model={model_file}",
            f"data.data_path=[{prefix}_text_document]", "data.preprocess_input=null",
            "data.split=90,10,0", "model.num_layers=2", "model.hidden_size=32",
            "model.ffn_hidden_size=64", "model.seq_length=32", "model.make_vocab_size_divisible_by=32",
            "training.micro_batch_size=4", "training.train_iters=20", "training.eval_interval=20",
            "training.eval_iters=1", "training.sample_tokens=4", "optimizer.lr_warmup_iters=1",
            f"checkpoint.save={save}", "checkpoint.save_interval=20", "logging.tensorboard_dir=null",
            "logging.log_interval=10"]) == 0
    finally:
        reset_layout()
    assert "validation loss at iteration 20" in capsys.readouterr().out
    assert gen.main(["--load", save, "--prompt", PROMPT, "--max-new-tokens", "12", "--greedy",
                     "--device", "cpu"]) == 0
    ours = capsys.readouterr().out

    from megatron.inference.loader import load_inference_model
    hf_dir = str(tmp_path / "hf")
    assert convert.main(["export", "--load-dir", save, "--save-dir", hf_dir]) == 0
    assert ("tokenizer.model" if kind == "SentencePieceTokenizer" else "tokenizer.json") in \
        os.listdir(hf_dir)
    im = load_inference_model(save, device=torch.device("cpu"))
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    prompt = im.tokenizer.tokenize(PROMPT)
    for text in (PROMPT, corpus_text(1)[:300]):
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == im.tokenizer.tokenize(text)
    assert hf_tok.eos_token_id == im.tokenizer.eod
    ids = torch.tensor([im.tokenizer.tokenize(corpus_text(1)[:400])[:32]])
    with torch.no_grad():
        _close(im.logits(ids), hf(ids).logits)
    assert ours == _greedy_hf(hf, hf_tok, prompt, 12, im.tokenizer.eod) + "\n"


def test_mixed_block_is_refused_in_one_line(tmp_path):
    """RoPE with GPT-2's LayerNorm and GeLU matches neither family: one line naming the options."""
    from megatron.checkpoint import CheckpointError, build_rank_files, export_to_hf, write_checkpoint
    from megatron.model import GPTModel
    from tests.helpers.model import tiny_cfg
    cfg = tiny_cfg(model__position_embedding_type="rope", tokenizer__type="NullTokenizer",
                   tokenizer__vocab_size=127)
    full = GPTModel(cfg, 128).state_dict()
    write_checkpoint(str(tmp_path / "ck"), 1, build_rank_files(cfg.to_dict(), 1, 0, full, 1, 1), 1)
    with pytest.raises(CheckpointError, match=r"position_embedding_type='rope' \(needs 'learned'\)"
                                              r".*nearest: gpt2") as e:
        export_to_hf(str(tmp_path / "ck"), str(tmp_path / "hf"), log=lambda *_: None)
    assert "\n" not in str(e.value) and not (tmp_path / "hf").exists()
