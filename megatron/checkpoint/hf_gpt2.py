"""Hugging Face transformers GPT-2 (GPT2LMHeadModel) <-> our GPT-2 block (tools/convert_hf.py).

Differences the mapping takes care of:

* HF's GPT-2 linears are ``Conv1D``: weights stored [in, out], ours [out, in].
* HF's fused ``c_attn`` output is [q (all heads), k, v]; ours is per head
  [np, 3, hn] (so that a TP column split keeps whole heads).
* Our word embedding is padded (multiple of ``make_vocab_size_divisible_by``
  x TP); HF's ``vocab_size`` is the tokenizer's. Export unpads, import re-pads
  with zero rows.
* GPT-2 uses the tanh approximation of GeLU (``gelu_new``), as we do.
"""
from megatron.checkpoint.files import CheckpointError
from megatron.checkpoint.hf_files import read_hf_weights
from megatron.checkpoint.reshard import WORD_EMBEDDINGS_KEY, resize_vocab, target_padded_vocab

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


# The model options of GPT-2's block (megatron.config.ModelConfig's defaults).
GPT2_BLOCK = {"position_embedding_type": "learned", "normalization": "LayerNorm",
              "activation": "gelu_tanh", "num_query_groups": None, "add_bias_linear": True,
              "untie_embeddings_and_output_weights": False}


def block_mismatches(model_cfg):
    """``[(option, value, GPT-2's value)]`` of each model option GPT2LMHeadModel cannot hold."""
    out = []
    for key, gpt2 in GPT2_BLOCK.items():
        value = model_cfg.get(key, gpt2)
        if key == "num_query_groups" and value == model_cfg.get("num_attention_heads"):
            value = None  # one group per head is plain multi-head attention
        if value != gpt2:
            out.append((key, value, gpt2))
    return out


def export_model(full, model_cfg, vocab, bos, eos):
    """``(GPT2Config, state dict, GPT2LMHeadModel, max length)`` of our full state."""
    from transformers import GPT2LMHeadModel
    config = hf_config(model_cfg, vocab, eos)
    return config, to_hf_state(full, model_cfg, vocab), GPT2LMHeadModel, config.n_positions


def import_model(hf_dir, raw, m, divisible_by, tp):
    """Our full state from the GPT-2 directory ``hf_dir`` (``raw``: its config.json), with the
    model section ``m`` filled in; returns ``(full state, the model's vocab_size)``."""
    from transformers import GPT2Config
    hc = GPT2Config.from_pretrained(hf_dir)
    if hc.activation_function not in _GELU_TANH:
        raise CheckpointError(f"{hf_dir} uses activation {hc.activation_function!r}; only the tanh "
                              f"GeLU ({', '.join(_GELU_TANH)}) matches this model")
    if getattr(hc, "scale_attn_by_inverse_layer_idx", False) or not getattr(hc, "scale_attn_weights", True):
        raise CheckpointError(f"{hf_dir}: attention scaling options differ from GPT-2's default")
    h = hc.n_embd
    full = from_hf_state(read_hf_weights(hf_dir), hc.n_layer, hc.n_head,
                         target_padded_vocab(hc.vocab_size, divisible_by, tp))
    m.num_layers, m.hidden_size, m.num_attention_heads = hc.n_layer, h, hc.n_head
    m.ffn_hidden_size = hc.n_inner if hc.n_inner not in (None, 4 * h) else None
    m.seq_length = m.max_position_embeddings = hc.n_positions
    m.hidden_dropout, m.attention_dropout = float(hc.resid_pdrop), float(hc.attn_pdrop)
    m.layernorm_epsilon = float(hc.layer_norm_epsilon)
    m.init_method_std = float(hc.initializer_range)
    return full, hc.vocab_size
