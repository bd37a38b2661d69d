"""Parameter names: Megatron-Core (local and Transformer Engine layer specs) and legacy
Megatron-LM <-> ours.

Megatron's rank files name layers by their index inside the model chunk (the
stage, or the virtual chunk); ours use global indices. Tensor layouts are the
same on both sides (QKV per query group [ng, np/ng + 2, hn], SwiGLU's fc1 as
[gate_r; up_r] per TP rank, vocabulary-padded embeddings), so a name map is the
whole conversion, apart from QKV in legacy files older than checkpoint version 2.
docs/checkpoints.md has the tables.
"""
import re

from megatron.checkpoint.files import CheckpointError

# Inside one layer: Megatron-Core's name -> ours. The Transformer Engine spec fuses
# each pre-norm into the following linear (layer_norm_weight / layer_norm_bias).
_CORE_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "input_layernorm.bias": "input_layernorm.bias",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "self_attention.linear_qkv.weight": "self_attention.query_key_value.weight",
    "self_attention.linear_qkv.bias": "self_attention.query_key_value.bias",
    "self_attention.linear_proj.weight": "self_attention.dense.weight",
    "self_attention.linear_proj.bias": "self_attention.dense.bias",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "pre_mlp_layernorm.bias": "post_attention_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "post_attention_layernorm.bias",
    "mlp.linear_fc1.weight": "mlp.dense_h_to_4h.weight",
    "mlp.linear_fc1.bias": "mlp.dense_h_to_4h.bias",
    "mlp.linear_fc2.weight": "mlp.dense_4h_to_h.weight",
    "mlp.linear_fc2.bias": "mlp.dense_4h_to_h.bias",
}
_CORE_TOP = {
    "embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
    "embedding.position_embeddings.weight": "embedding.position_embeddings.weight",
    "decoder.final_layernorm.weight": "final_layernorm.weight",
    "decoder.final_layernorm.bias": "final_layernorm.bias",
    "output_layer.weight": "output_layer.weight",
}
# Legacy Megatron-LM (megatron/legacy/model): older files say *_layernorm, newer *_norm.
_LEGACY_LAYER = {
    "input_norm.weight": "input_layernorm.weight",
    "input_norm.bias": "input_layernorm.bias",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_attention_norm.bias": "post_attention_layernorm.bias",
    **{n: n for n in ("input_layernorm.weight", "input_layernorm.bias",
                      "self_attention.query_key_value.weight",
                      "self_attention.query_key_value.bias",
                      "self_attention.dense.weight", "self_attention.dense.bias",
                      "post_attention_layernorm.weight", "post_attention_layernorm.bias",
                      "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
                      "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias")},
}
_LEGACY_TOP = {
    "language_model.embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
    "language_model.embedding.position_embeddings.weight": "embedding.position_embeddings.weight",
    "language_model.output_layer.weight": "output_layer.weight",
    # The last stage's copy of the tied word embedding.
    "word_embeddings_for_head.weight": "output_layer.weight",
}
for _stack in ("encoder", "transformer"):
    for _norm in ("final_norm", "final_layernorm"):
        for _p in ("weight", "bias"):
            _LEGACY_TOP[f"language_model.{_stack}.{_norm}.{_p}"] = f"final_layernorm.{_p}"

_CORE_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LEGACY_LAYER_KEY = re.compile(r"^language_model\.(?:encoder|transformer)\.layers\.(\d+)\.(.+)$")
_IGNORED = re.compile(r"(\._extra_state|\.inv_freq)$")

# Ours -> Megatron-Core, per layer spec ("local": torch norms; "transformer_engine":
# norms fused into linear_qkv / linear_fc1), and the modules holding an _extra_state.
_EXPORT_LAYER = {
    "local": {ours: theirs for theirs, ours in _CORE_LAYER.items() if "layer_norm_" not in theirs},
    "transformer_engine": {ours: theirs for theirs, ours in _CORE_LAYER.items()
                           if not theirs.startswith(("input_layernorm", "pre_mlp_layernorm"))},
}
_EXTRA_STATE = {
    "local": ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1",
              "mlp.linear_fc2"),
    "transformer_engine": ("self_attention.linear_qkv", "self_attention.core_attention",
                           "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"),
}
TRANSFORMER_IMPLS = tuple(_EXPORT_LAYER)


def flatten(state, prefix=""):
    """A nested state dict (legacy Megatron-LM's {"language_model": {"embedding": ...}})
    as one level of dotted names."""
    out = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def is_legacy(names):
    """True for legacy Megatron-LM names (``language_model.*``), False for Megatron-Core's."""
    return any(n.startswith("language_model.") for n in names)


def local_layer_count(names):
    """How many transformer layers a chunk's (flattened) names hold."""
    found = set()
    for n in names:
        m = _CORE_LAYER_KEY.match(n) or _LEGACY_LAYER_KEY.match(n)
        if m:
            found.add(int(m.group(1)))
    return max(found) + 1 if found else 0


def to_ours(names_values, layer_offset, untied, where):
    """One Megatron model chunk's flattened state in our names (global layer indices).

    The tied word embedding's copy on the last stage and the extra states are
    dropped; a name this model has no place for is refused."""
    out = {}
    for name, value in names_values.items():
        if _IGNORED.search(name):
            continue
        m = _CORE_LAYER_KEY.match(name) or _LEGACY_LAYER_KEY.match(name)
        if m:
            table = _CORE_LAYER if name.startswith("decoder.") else _LEGACY_LAYER
            ours = table.get(m.group(2))
            if ours is not None:
                ours = f"layers.{int(m.group(1)) + layer_offset}.{ours}"
        else:
            ours = _CORE_TOP.get(name) or _LEGACY_TOP.get(name)
        if ours is None:
            raise CheckpointError(f"{where} holds {name}, which this model has no place for "
                                  f"(an option it does not have)")
        if ours == "output_layer.weight" and not untied:
            continue  # the last stage's copy of the tied word embedding
        if ours in out:
            raise CheckpointError(f"{where} holds two tensors for {ours} (e.g. a layer norm both "
                                  f"fused into the linear and on its own)")
        out[ours] = value
    return out


def expected_names(model_cfg):
    """Our full state's names for a model config dict, in the model's order."""
    bias = model_cfg.get("add_bias_linear", True)
    layer_norm = model_cfg.get("normalization", "LayerNorm") == "LayerNorm"
    names = ["embedding.word_embeddings.weight"]
    if model_cfg.get("position_embedding_type", "learned") == "learned":
        names.append("embedding.position_embeddings.weight")
    per_layer = []
    for module, has_bias in (("input_layernorm", layer_norm),
                             ("self_attention.query_key_value", bias),
                             ("self_attention.dense", bias),
                             ("post_attention_layernorm", layer_norm),
                             ("mlp.dense_h_to_4h", bias), ("mlp.dense_4h_to_h", bias)):
        per_layer += [f"{module}.weight"] + ([f"{module}.bias"] if has_bias else [])
    names += [f"layers.{i}.{n}" for i in range(int(model_cfg["num_layers"])) for n in per_layer]
    names += ["final_layernorm.weight"] + (["final_layernorm.bias"] if layer_norm else [])
    if model_cfg.get("untie_embeddings_and_output_weights", False):
        names.append("output_layer.weight")
    return names


def to_megatron_core(chunk, layer_start, first, last, untied, impl):
    """One of our model chunks (global layer indices) in Megatron-Core names for layer spec
    ``impl``, with the ``_extra_state`` entries (None) that Megatron-Core's modules load.

    A last stage that is not the first holds the tied word embedding as
    ``output_layer.weight``, as Megatron-Core's GPTModel does."""
    table = _EXPORT_LAYER[impl]
    out = {}
    layers = set()
    for name, value in chunk.items():
        m = re.match(r"^layers\.(\d+)\.(.+)$", name)
        if m:
            local = int(m.group(1)) - layer_start
            layers.add(local)
            out[f"decoder.layers.{local}.{table[m.group(2)]}"] = value
        elif name == "embedding.word_embeddings.weight" and not first:
            out["output_layer.weight"] = value
        elif name.startswith("final_layernorm."):
            out[f"decoder.{name}"] = value
        else:
            out[name] = value
    for local in sorted(layers):
        for module in _EXTRA_STATE[impl]:
            out[f"decoder.layers.{local}.{module}._extra_state"] = None
    if last:
        out["output_layer._extra_state"] = None
    return out


def fix_old_qkv(tensor, checkpoint_version, heads_per_rank):
    """A legacy QKV shard of checkpoint version 0 ([3, np, hn] rows) or 1.0 ([np, hn, 3])
    in the per-head [np, 3, hn] order of version 2 and later (Megatron-LM's
    fix_query_key_value_ordering)."""
    rest = tuple(tensor.shape[1:])
    if checkpoint_version == 0:
        t = tensor.reshape(3, heads_per_rank, -1, *rest).transpose(0, 1)
    elif checkpoint_version == 1:
        t = tensor.reshape(heads_per_rank, -1, 3, *rest).transpose(1, 2)
    else:
        return tensor
    return t.reshape(tensor.shape).contiguous()
