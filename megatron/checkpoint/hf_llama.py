"""Hugging Face transformers Llama (LlamaForCausalLM) <-> our Llama-style block (tools/convert_hf.py).

Our block with ``position_embedding_type: rope``, ``normalization: RMSNorm`` and
``activation: swiglu`` holds LlamaForCausalLM's tensors; docs/models.md gives the table.
Differences the mapping takes care of:

* The fused QKV rows are ordered per query group, [ng, np/ng + 2, hn] (query heads, key,
  value); HF keeps q_proj [np hn], k_proj and v_proj [ng hn] apart. Query head j reads
  group j // (np / ng) in both, so no head is permuted.
* ``mlp.dense_h_to_4h`` is [gate; up] (merged state); HF has gate_proj and up_proj.
* RoPE: both rotate the halves (i, i + d/2) of each head (HF's rotate_half), so q and k
  rows map one to one (Meta's original checkpoints pair (2i, 2i+1): HF's own conversion
  permuted them already).
* ``add_bias_linear`` is HF's ``attention_bias`` and ``mlp_bias`` together; the untied output
  layer is ``lm_head`` (``tie_word_embeddings`` false).
* Vocabulary padding as for GPT-2: export unpads the word embedding and the output layer,
  import re-pads them with zero rows.
"""
import torch

from megatron.checkpoint.files import CheckpointError
from megatron.checkpoint.hf_files import hf_getter, read_hf_weights
from megatron.checkpoint.reshard import (OUTPUT_LAYER_KEY, WORD_EMBEDDINGS_KEY, resize_vocab,
                                         target_padded_vocab)

# The options that make our block Llama's; the others (query groups, biases, tying) map onto
# LlamaConfig fields.
LLAMA_BLOCK = {"position_embedding_type": "rope", "normalization": "RMSNorm",
               "activation": "swiglu", "rotary_percent": 1.0}
_DEFAULTS = {"position_embedding_type": "learned", "normalization": "LayerNorm",
             "activation": "gelu_tanh", "rotary_percent": 1.0}

# ours (after "layers.{i}.") -> HF (after "model.layers.{i}."), one to one
_LAYER_MAP = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "self_attention.dense.bias": "self_attn.o_proj.bias",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
    "mlp.dense_4h_to_h.bias": "mlp.down_proj.bias",
}


def block_mismatches(model_cfg):
    """``[(option, value, Llama's value)]`` of each model option LlamaForCausalLM cannot hold."""
    return [(k, model_cfg.get(k, _DEFAULTS[k]), v) for k, v in LLAMA_BLOCK.items()
            if model_cfg.get(k, _DEFAULTS[k]) != v]


def split_qkv(t, heads, groups):
    """Our per-group QKV rows (weight [rows, h] or bias [rows]) -> HF's (q, k, v)."""
    per_group, rest = heads // groups, t.shape[1:]
    w = t.reshape(groups, per_group + 2, -1, *rest)
    hn = w.shape[2]
    return (w[:, :per_group].reshape(heads * hn, *rest).clone(),
            w[:, per_group].reshape(groups * hn, *rest).clone(),
            w[:, per_group + 1].reshape(groups * hn, *rest).clone())


def merge_qkv(q, k, v, heads, groups):
    """HF's q, k, v (weights or biases) -> our per-group QKV rows."""
    rest = q.shape[1:]
    hn = q.shape[0] // heads
    return torch.cat([q.reshape(groups, heads // groups, hn, *rest),
                      k.reshape(groups, 1, hn, *rest), v.reshape(groups, 1, hn, *rest)],
                     dim=1).reshape(-1, *rest)


def to_hf_state(full, model_cfg, vocab):
    """LlamaForCausalLM's state dict (without a tied lm_head) from our full state."""
    heads = int(model_cfg["num_attention_heads"])
    groups = int(model_cfg.get("num_query_groups") or heads)
    out = {"model.embed_tokens.weight": full[WORD_EMBEDDINGS_KEY][:vocab].clone()}
    for i in range(int(model_cfg["num_layers"])):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = full.get(p + f"self_attention.query_key_value.{kind}")
            if qkv is not None:
                for name, t in zip("qkv", split_qkv(qkv, heads, groups)):
                    out[q + f"self_attn.{name}_proj.{kind}"] = t
            fc1 = full.get(p + f"mlp.dense_h_to_4h.{kind}")
            if fc1 is not None:
                gate, up = fc1.chunk(2)
                out[q + f"mlp.gate_proj.{kind}"], out[q + f"mlp.up_proj.{kind}"] = gate.clone(), up.clone()
        for ours, theirs in _LAYER_MAP.items():
            if p + ours in full:
                out[q + theirs] = full[p + ours].clone()
    out["model.norm.weight"] = full["final_layernorm.weight"].clone()
    if OUTPUT_LAYER_KEY in full:
        out["lm_head.weight"] = full[OUTPUT_LAYER_KEY][:vocab].clone()
    return out


def from_hf_state(get, num_layers, heads, groups, bias, tied, padded_vocab):
    """Our full state (vocabulary padded to ``padded_vocab``) in GPTModel's name order, from
    ``get(hf_name)`` (``hf_files.hf_getter``)."""
    full = {WORD_EMBEDDINGS_KEY: resize_vocab(get("model.embed_tokens.weight").clone(), padded_vocab)}
    kinds = ("weight", "bias") if bias else ("weight",)
    for i in range(num_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        full[p + "input_layernorm.weight"] = get(q + "input_layernorm.weight").clone()
        for kind in kinds:
            full[p + f"self_attention.query_key_value.{kind}"] = merge_qkv(
                *(get(q + f"self_attn.{n}_proj.{kind}") for n in "qkv"), heads, groups)
        for kind in kinds:
            full[p + f"self_attention.dense.{kind}"] = get(q + f"self_attn.o_proj.{kind}").clone()
        full[p + "post_attention_layernorm.weight"] = get(q + "post_attention_layernorm.weight").clone()
        for kind in kinds:
            full[p + f"mlp.dense_h_to_4h.{kind}"] = torch.cat(
                [get(q + f"mlp.gate_proj.{kind}"), get(q + f"mlp.up_proj.{kind}")], dim=0)
        for kind in kinds:
            full[p + f"mlp.dense_4h_to_h.{kind}"] = get(q + f"mlp.down_proj.{kind}").clone()
    full["final_layernorm.weight"] = get("model.norm.weight").clone()
    if not tied:
        full[OUTPUT_LAYER_KEY] = resize_vocab(get("lm_head.weight").clone(), padded_vocab)
    return full


def hf_config(model_cfg, vocab, bos, eos):
    """transformers.LlamaConfig for our model config."""
    from transformers import LlamaConfig
    h, heads = int(model_cfg["hidden_size"]), int(model_cfg["num_attention_heads"])
    bias = bool(model_cfg.get("add_bias_linear", True))
    return LlamaConfig(
        vocab_size=int(vocab), hidden_size=h, intermediate_size=int(model_cfg["ffn_hidden_size"] or 4 * h),
        num_hidden_layers=int(model_cfg["num_layers"]), num_attention_heads=heads,
        num_key_value_heads=int(model_cfg.get("num_query_groups") or heads), head_dim=h // heads,
        hidden_act="silu",
        max_position_embeddings=int(model_cfg.get("max_position_embeddings") or model_cfg["seq_length"]),
        rms_norm_eps=float(model_cfg.get("layernorm_epsilon", 1e-5)),
        rope_theta=float(model_cfg.get("rotary_base", 10000)),
        attention_bias=bias, mlp_bias=bias,
        attention_dropout=float(model_cfg.get("attention_dropout", 0.0)),
        initializer_range=float(model_cfg.get("init_method_std", 0.02)),
        tie_word_embeddings=not model_cfg.get("untie_embeddings_and_output_weights", False),
        bos_token_id=int(bos), eos_token_id=int(eos))


def export_model(full, model_cfg, vocab, bos, eos):
    """``(LlamaConfig, state dict, LlamaForCausalLM, max length)`` of our full state."""
    from transformers import LlamaForCausalLM
    config = hf_config(model_cfg, vocab, bos, eos)
    return config, to_hf_state(full, model_cfg, vocab), LlamaForCausalLM, config.max_position_embeddings


def rope_settings(raw):
    """(theta, rope type, partial rotary factor) of a Llama config.json in either layout:
    transformers 5's ``rope_parameters`` or 4.x's ``rope_theta`` + ``rope_scaling``."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    return theta, kind, partial


def import_model(hf_dir, raw, m, divisible_by, tp):
    """Our full state from the Llama directory ``hf_dir`` (``raw``: its config.json), with the
    model section ``m`` filled in; returns ``(full state, the model's vocab_size)``."""
    h, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    groups = int(raw.get("num_key_value_heads") or heads)
    theta, kind, partial = rope_settings(raw)
    checks = [("hidden_act", raw.get("hidden_act", "silu"), "silu"),
              ("rope type", kind, "default"), ("partial_rotary_factor", partial, 1.0),
              ("head_dim", raw.get("head_dim") or h // heads, h // heads),
              ("mlp_bias", bool(raw.get("mlp_bias", False)), bool(raw.get("attention_bias", False))),
              ("rope_theta", float(theta), float(int(theta)))]
    for name, value, want in checks:
        if value != want:
            raise CheckpointError(f"{hf_dir}: {name}={value!r}; this model needs {want!r} "
                                  f"(Llama's block with plain RoPE, SiLU, h / heads dims, one bias "
                                  f"setting for attention and MLP, an integral rope_theta)")
    vocab = int(raw["vocab_size"])
    bias, tied = bool(raw.get("attention_bias", False)), bool(raw.get("tie_word_embeddings", False))
    layers = int(raw["num_hidden_layers"])
    full = from_hf_state(hf_getter(read_hf_weights(hf_dir), hf_dir), layers, heads, groups, bias,
                         tied, target_padded_vocab(vocab, divisible_by, tp))
    m.num_layers, m.hidden_size, m.num_attention_heads = layers, h, heads
    m.num_query_groups = groups
    m.ffn_hidden_size = int(raw["intermediate_size"])
    m.seq_length = m.max_position_embeddings = int(raw.get("max_position_embeddings", 2048))
    m.position_embedding_type, m.rotary_base, m.rotary_percent = "rope", int(theta), 1.0
    m.normalization, m.activation = "RMSNorm", "swiglu"
    m.layernorm_epsilon = float(raw.get("rms_norm_eps", 1e-6))
    m.add_bias_linear, m.untie_embeddings_and_output_weights = bias, not tied
    m.hidden_dropout, m.attention_dropout = 0.0, float(raw.get("attention_dropout", 0.0))
    m.init_method_std = float(raw.get("initializer_range", 0.02))
    return full, vocab
