"""Hugging Face transformers GPT-2 <-> our checkpoints (the logic of tools/convert_hf.py).

Differences the mapping takes care of:

* HF's GPT-2 linears are ``Conv1D``: weights stored [in, out], ours [out, in].
* HF's fused ``c_attn`` output is [q (all heads), k, v]; ours is per head
  [np, 3, hn] (so that a TP column split keeps whole heads).
* Our word embedding is padded (multiple of ``make_vocab_size_divisible_by``
  x TP); HF's ``vocab_size`` is the tokenizer's. Export unpads, import re-pads
  with zero rows.
* GPT-2 uses the tanh approximation of GeLU (``gelu_new``), as we do.
"""
import json
import os
import shutil

import torch

from megatron.checkpoint.files import CheckpointError, replace_dir
from megatron.checkpoint.reshard import (WORD_EMBEDDINGS_KEY, CheckpointShards, merge_model_state,
                                         resize_vocab, target_padded_vocab)

_LAYER_MAP = {  # ours (after "layers.{i}.") -> HF (after "transformer.h.{i}."), Conv1D?
    "input_layernorm.weight": ("ln_1.weight", False),
    "input_layernorm.bias": ("ln_1.bias", False),
    "self_attention.dense.weight": ("attn.c_proj.weight", True),
    "self_attention.dense.bias": ("attn.c_proj.bias", False),
    "post_attention_layernorm.weight": ("ln_2.weight", False),
    "post_attention_layernorm.bias": ("ln_2.bias", False),
    "mlp.dense_h_to_4h.weight": ("mlp.c_fc.weight", True),
    "mlp.dense_h_to_4h.bias": ("mlp.c_fc.bias", False),
    "mlp.dense_4h_to_h.weight": ("mlp.c_proj.weight", True),
    "mlp.dense_4h_to_h.bias": ("mlp.c_proj.bias", False),
}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def qkv_per_head_to_hf(t, num_heads):
    """[np, 3, hn, ...] rows (ours) -> [3, np, hn, ...] rows (HF's q, k, v blocks)."""
    rest = t.shape[1:]
    return t.reshape(num_heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape[0], *rest)


def qkv_hf_to_per_head(t, num_heads):
    """[3, np, hn, ...] rows (HF) -> [np, 3, hn, ...] rows (ours)."""
    rest = t.shape[1:]
    return t.reshape(3, num_heads, -1, *rest).transpose(0, 1).reshape(t.shape[0], *rest)


def to_hf_state(full, model_cfg, vocab_size):
    """HF GPT2LMHeadModel state dict (without the tied lm_head) from our full state."""
    heads = int(model_cfg["num_attention_heads"])
    out = {"transformer.wte.weight": full[WORD_EMBEDDINGS_KEY][:vocab_size].clone(),
           "transformer.wpe.weight": full["embedding.position_embeddings.weight"].clone(),
           "transformer.ln_f.weight": full["final_layernorm.weight"].clone(),
           "transformer.ln_f.bias": full["final_layernorm.bias"].clone()}
    for i in range(int(model_cfg["num_layers"])):
        p, q = f"layers.{i}.", f"transformer.h.{i}."
        w = qkv_per_head_to_hf(full[p + "self_attention.query_key_value.weight"], heads)
        out[q + "attn.c_attn.weight"] = w.t().contiguous()
        out[q + "attn.c_attn.bias"] = qkv_per_head_to_hf(
            full[p + "self_attention.query_key_value.bias"], heads).clone()
        for ours, (theirs, conv) in _LAYER_MAP.items():
            t = full[p + ours]
            out[q + theirs] = t.t().contiguous() if conv else t.clone()
    return out


def from_hf_state(hf, num_layers, num_heads, padded_vocab):
    """Our full state (vocabulary padded to ``padded_vocab``) from an HF GPT-2 state dict."""
    def get(name):
        for key in (name, name.replace("transformer.", "", 1)):
            if key in hf:
                return hf[key]
        raise CheckpointError(f"the Hugging Face model lacks {name}")
    full = {WORD_EMBEDDINGS_KEY: resize_vocab(get("transformer.wte.weight").clone(), padded_vocab),
            "embedding.position_embeddings.weight": get("transformer.wpe.weight").clone()}
    for i in range(num_layers):
        p, q = f"layers.{i}.", f"transformer.h.{i}."
        full[p + "input_layernorm.weight"] = get(q + "ln_1.weight").clone()
        full[p + "input_layernorm.bias"] = get(q + "ln_1.bias").clone()
        full[p + "self_attention.query_key_value.weight"] = qkv_hf_to_per_head(
            get(q + "attn.c_attn.weight").t().contiguous(), num_heads)
        full[p + "self_attention.query_key_value.bias"] = qkv_hf_to_per_head(
            get(q + "attn.c_attn.bias").clone(), num_heads)
        for ours, (theirs, conv) in _LAYER_MAP.items():
            if ours.startswith("input_layernorm"):
                continue
            t = get(q + theirs)
            full[p + ours] = t.t().contiguous() if conv else t.clone()
    full["final_layernorm.weight"] = get("transformer.ln_f.weight").clone()
    full["final_layernorm.bias"] = get("transformer.ln_f.bias").clone()
    # Keep the model's own order (embedding, then per layer), as GPTModel names them.
    order = ["input_layernorm.weight", "input_layernorm.bias",
             "self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
             "self_attention.dense.weight", "self_attention.dense.bias",
             "post_attention_layernorm.weight", "post_attention_layernorm.bias",
             "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
             "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias"]
    names = [WORD_EMBEDDINGS_KEY, "embedding.position_embeddings.weight"]
    names += [f"layers.{i}.{n}" for i in range(num_layers) for n in order]
    names += ["final_layernorm.weight", "final_layernorm.bias"]
    return {n: full[n] for n in names}


def hf_config(model_cfg, vocab_size, eod):
    """transformers.GPT2Config for our model config."""
    from transformers import GPT2Config
    h = int(model_cfg["hidden_size"])
    ffn = model_cfg.get("ffn_hidden_size")
    return GPT2Config(
        vocab_size=int(vocab_size),
        n_positions=int(model_cfg.get("max_position_embeddings") or model_cfg["seq_length"]),
        n_embd=h, n_layer=int(model_cfg["num_layers"]), n_head=int(model_cfg["num_attention_heads"]),
        n_inner=None if ffn in (None, 4 * h) else int(ffn), activation_function="gelu_new",
        resid_pdrop=float(model_cfg.get("hidden_dropout", 0.1)),
        embd_pdrop=float(model_cfg.get("hidden_dropout", 0.1)),
        attn_pdrop=float(model_cfg.get("attention_dropout", 0.1)),
        layer_norm_epsilon=float(model_cfg.get("layernorm_epsilon", 1e-5)),
        initializer_range=float(model_cfg.get("init_method_std", 0.02)),
        bos_token_id=int(eod), eos_token_id=int(eod), tie_word_embeddings=True)


def _write_tokenizer_files(tok_cfg, out_dir, n_positions):
    """Copy the GPT-2 BPE files (or tokenizer.json) next to the model; returns what was written."""
    kind = tok_cfg.get("type")
    written = []
    if kind == "GPT2BPETokenizer":
        shutil.copyfile(tok_cfg["vocab_file"], os.path.join(out_dir, "vocab.json"))
        shutil.copyfile(tok_cfg["merge_file"], os.path.join(out_dir, "merges.txt"))
        written = ["vocab.json", "merges.txt"]
        special = "<|endoftext|>"
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "GPT2Tokenizer", "bos_token": special,
                       "eos_token": special, "unk_token": special,
                       "model_max_length": n_positions, "add_prefix_space": False}, f, indent=2)
        written.append("tokenizer_config.json")
    elif kind == "HuggingFaceTokenizer":
        shutil.copyfile(tok_cfg["tokenizer_model"], os.path.join(out_dir, "tokenizer.json"))
        written = ["tokenizer.json"]
    return written


# The model options of GPT-2's block (megatron.config.ModelConfig's defaults).
_GPT2_BLOCK = {"position_embedding_type": "learned", "normalization": "LayerNorm",
               "activation": "gelu_tanh", "num_query_groups": None, "add_bias_linear": True,
               "untie_embeddings_and_output_weights": False}


def _require_gpt2_block(model_cfg, load_dir):
    """CheckpointError naming the first model option that GPT2LMHeadModel cannot hold."""
    for key, gpt2 in _GPT2_BLOCK.items():
        value = model_cfg.get(key, gpt2)
        if key == "num_query_groups" and value == model_cfg.get("num_attention_heads"):
            value = None  # one group per head is plain multi-head attention
        if value != gpt2:
            raise CheckpointError(f"checkpoint {load_dir} has model.{key}={value!r}; Hugging Face "
                                  f"GPT-2 export needs {gpt2!r} (a GPT-2 block)")


def export_to_hf(load_dir, save_dir, vocab_size=None, log=print):
    """Write ``save_dir`` (config.json, model.safetensors, tokenizer files) from any checkpoint layout."""
    from transformers import GPT2LMHeadModel
    from megatron.checkpoint.convert import tokenizer_of
    shards = CheckpointShards(load_dir)
    model_cfg = shards.config.get("model") or {}
    _require_gpt2_block(model_cfg, load_dir)
    full = merge_model_state(shards)
    rows = full[WORD_EMBEDDINGS_KEY].shape[0]
    tokenizer = tokenizer_of(shards.config)
    vocab = vocab_size or (tokenizer.vocab_size if tokenizer is not None else None)
    if vocab is None:
        raise CheckpointError(f"cannot build the tokenizer of {load_dir} to learn the vocabulary "
                              f"size; pass --vocab-size")
    if vocab > rows:
        raise CheckpointError(f"vocabulary size {vocab} exceeds the checkpoint's {rows} embedding rows")
    # Without its tokenizer, the end of document is taken to be the last id.
    eod = tokenizer.eod if tokenizer is not None else vocab - 1
    config = hf_config(model_cfg, vocab, eod)
    model = GPT2LMHeadModel(config)
    state = to_hf_state(full, model_cfg, vocab)
    model = model.to(state["transformer.wte.weight"].dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" and not k.endswith(".attn.bias")
               and not k.endswith(".attn.masked_bias")]
    if missing or unexpected:
        raise CheckpointError(f"export mapping mismatch: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}")
    model.tie_weights()
    tmp = save_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok_files = _write_tokenizer_files(shards.config.get("tokenizer") or {}, tmp, config.n_positions)
    replace_dir(tmp, save_dir)
    log(f"exported {load_dir} (iteration {shards.iteration}, TP={shards.tp} PP={shards.pp}) to "
        f"{save_dir}: vocabulary {vocab} (unpadded from {rows}), tokenizer files "
        f"{tok_files or 'none (not a GPT-2 BPE / tokenizer.json tokenizer)'}")
    return save_dir


def import_from_hf(hf_dir, save_dir, tp=1, pp=1, divisible_by=None, seed=None, log=print):
    """Write a checkpoint (iteration 0, at TP x PP) from a local transformers GPT-2 directory.

    ``divisible_by`` and ``seed`` default to the config's
    ``model.make_vocab_size_divisible_by`` and ``training.seed``.
    """
    from transformers import GPT2Config
    from megatron.checkpoint.convert import build_rank_files, write_checkpoint
    from megatron.config import Config
    cfg = Config()
    if divisible_by is None:
        divisible_by = cfg.model.make_vocab_size_divisible_by
    if seed is None:
        seed = cfg.training.seed
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise CheckpointError(f"{hf_dir} has no config.json (not a Hugging Face model directory)")
    hc = GPT2Config.from_pretrained(hf_dir)
    if hc.model_type != "gpt2":
        raise CheckpointError(f"{hf_dir} holds a {hc.model_type!r} model, not gpt2")
    if hc.activation_function not in _GELU_TANH:
        raise CheckpointError(f"{hf_dir} uses activation {hc.activation_function!r}; only the tanh "
                              f"GeLU ({', '.join(_GELU_TANH)}) matches this model")
    if getattr(hc, "scale_attn_by_inverse_layer_idx", False) or not getattr(hc, "scale_attn_weights", True):
        raise CheckpointError(f"{hf_dir}: attention scaling options differ from GPT-2's default")
    hf = _read_hf_weights(hf_dir)
    h = hc.n_embd
    padded = target_padded_vocab(hc.vocab_size, divisible_by, tp)
    full = from_hf_state(hf, hc.n_layer, hc.n_head, padded)
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads = hc.n_layer, h, hc.n_head
    m.ffn_hidden_size = hc.n_inner if hc.n_inner not in (None, 4 * h) else None
    m.seq_length = m.max_position_embeddings = hc.n_positions
    m.make_vocab_size_divisible_by = divisible_by
    m.hidden_dropout, m.attention_dropout = float(hc.resid_pdrop), float(hc.attn_pdrop)
    m.layernorm_epsilon = float(hc.layer_norm_epsilon)
    m.init_method_std = float(hc.initializer_range)
    cfg.training.seed = seed
    os.makedirs(save_dir, exist_ok=True)
    tok_dir = os.path.abspath(os.path.join(save_dir, "tokenizer"))
    if os.path.isfile(os.path.join(hf_dir, "vocab.json")) and \
            os.path.isfile(os.path.join(hf_dir, "merges.txt")):
        os.makedirs(tok_dir, exist_ok=True)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(tok_dir, name))
        cfg.tokenizer.type = "GPT2BPETokenizer"
        cfg.tokenizer.vocab_file = os.path.join(tok_dir, "vocab.json")
        cfg.tokenizer.merge_file = os.path.join(tok_dir, "merges.txt")
    elif os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        os.makedirs(tok_dir, exist_ok=True)
        shutil.copyfile(os.path.join(hf_dir, "tokenizer.json"), os.path.join(tok_dir, "tokenizer.json"))
        cfg.tokenizer.type = "HuggingFaceTokenizer"
        cfg.tokenizer.tokenizer_model = os.path.join(tok_dir, "tokenizer.json")
    else:
        # No tokenizer files: ids only (the null tokenizer's end of document is its last id).
        cfg.tokenizer.type = "NullTokenizer"
        cfg.tokenizer.vocab_size = hc.vocab_size - 1
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    files = build_rank_files(cfg.to_dict(), 0, 0, full, tp, pp)
    out = write_checkpoint(save_dir, 0, files, pp)
    log(f"imported {hf_dir} to {out}: {hc.n_layer} layers, hidden {h}, {hc.n_head} heads, "
        f"vocabulary {hc.vocab_size} padded to {padded}, TP={tp} PP={pp}, tokenizer "
        f"{cfg.tokenizer.type}")
    return out


def _read_hf_weights(hf_dir):
    st = os.path.join(hf_dir, "model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file
        return load_file(st)
    pt = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.isfile(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise CheckpointError(f"{hf_dir} holds neither model.safetensors nor pytorch_model.bin "
                          f"(sharded weights are not supported)")
