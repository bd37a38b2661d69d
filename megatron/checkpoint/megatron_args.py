"""Megatron-LM's saved `args` (an argparse.Namespace) <-> this project's config.

Import reads the model shape and options, the tokenizer, and the training
settings whose meaning is the same here; an option this model does not have
(MoE, QK-norm, 1p LayerNorm, ...) is refused in one line naming the arg.
Export writes the args Megatron-LM checks or reads when it loads a checkpoint
(`check_checkpoint_args`, `--use-checkpoint-args`). docs/checkpoints.md has the
table.
"""
import argparse
import os

import torch

from megatron.checkpoint.files import CheckpointError

_EXPORT_VERSION_NOTE = "written by megatron-gpt tools/convert_megatron.py"

# Options of Megatron-LM's model this model does not have: (arg, the value that
# means "off"). An arg absent from old args means off too.
_UNSUPPORTED = (
    ("num_experts", None), ("qk_layernorm", False), ("apply_layernorm_1p", False),
    ("layernorm_zero_centered_gamma", False), ("apply_residual_connection_post_layernorm", False),
    ("squared_relu", False), ("quick_geglu", False), ("rotary_interleaved", False), ("use_rope_scaling", False),
    ("rotary_seq_len_interpolation_factor", None), ("multi_latent_attention", False),
    ("is_hybrid_model", False), ("mtp_num_layers", None), ("heterogeneous_layers_config_path", None),
)
_PRECISIONS = (("bf16", "bf16"), ("fp16", "fp16"))
_DECAY_STYLES = ("cosine", "linear", "constant")


def _get(args, name, default=None):
    value = getattr(args, name, default)
    return default if value is None else value


def megatron_activation(args, legacy=False):
    """Our ``model.activation`` for Megatron-LM ``args`` (``legacy``: the weights come from
    the legacy model, megatron/legacy/model, rather than Megatron-Core's).

    SwiGLU when ``swiglu``. Otherwise GeLU, exact (erf) unless the bias-GeLU fusion is
    on (``bias_gelu_fusion``, Megatron-Core's ``bias_activation_fusion``) with biases,
    whose fused kernel is the tanh approximation. The legacy model also reads
    ``openai_gelu`` (tanh) and ``onnx_safe`` (erf), both before the fusion flag;
    Megatron-Core's config builder never reads them. Args without a fusion flag get
    Megatron-LM's default, fusion on.
    """
    if _get(args, "swiglu", False):
        return "swiglu"
    if legacy and _get(args, "openai_gelu", False):
        return "gelu_tanh"
    if legacy and _get(args, "onnx_safe", False):
        return "gelu"
    flags = [getattr(args, n) for n in ("bias_gelu_fusion", "bias_activation_fusion")
             if getattr(args, n, None) is not None]
    fused = any(flags) if flags else True
    return "gelu_tanh" if fused and _get(args, "add_bias_linear", True) else "gelu"


def check_supported(args, where):
    """CheckpointError naming the first Megatron-LM option this model cannot hold."""
    for name, off in _UNSUPPORTED:
        value = getattr(args, name, off)
        if value not in (off, None, False, 0):
            raise CheckpointError(f"{where} was trained with {name}={value!r}, which this model "
                                  f"does not have")
    pos = _get(args, "position_embedding_type", "learned_absolute")
    if _get(args, "use_rotary_position_embeddings", False):
        pos = "rope"
    if pos not in ("learned_absolute", "rope"):
        raise CheckpointError(f"{where} has position_embedding_type={pos!r}; only learned_absolute "
                              f"and rope are supported")
    heads, hidden = int(args.num_attention_heads), int(args.hidden_size)
    kv = getattr(args, "kv_channels", None)
    if kv is not None and int(kv) * heads != hidden:
        raise CheckpointError(f"{where} has kv_channels={kv} with num_attention_heads={heads}, "
                              f"hidden_size={hidden}; this model needs kv_channels x heads = hidden")
    if not _get(args, "add_bias_linear", True) and _get(args, "add_qkv_bias", False):
        raise CheckpointError(f"{where} has add_qkv_bias=True with add_bias_linear=False (a QKV "
                              f"bias alone), which this model does not have")
    if _get(args, "normalization", "LayerNorm") not in ("LayerNorm", "RMSNorm"):
        raise CheckpointError(f"{where} has normalization={args.normalization!r}")
    return pos


def query_groups(args):
    """The number of K/V groups: ``num_query_groups`` only counts with
    ``group_query_attention`` (Megatron-LM saves 1 otherwise)."""
    if _get(args, "group_query_attention", False) and getattr(args, "num_query_groups", None):
        return int(args.num_query_groups)
    return int(args.num_attention_heads)


def tokenizer_section(args):
    """``(section, why)``: our tokenizer section for Megatron-LM's tokenizer args, or
    when its files are not on this machine ``(None, the reason)``."""
    kind = _get(args, "tokenizer_type", None)
    files = {"vocab_file": _get(args, "vocab_file"), "merge_file": _get(args, "merge_file"),
             "tokenizer_model": _get(args, "tokenizer_model")}
    if kind == "NullTokenizer" and _get(args, "vocab_size") is not None:
        return {"type": "NullTokenizer", "vocab_size": int(args.vocab_size)}, None
    if kind == "GPT2BPETokenizer" and all(f and os.path.isfile(f)
                                          for f in (files["vocab_file"], files["merge_file"])):
        return {"type": "GPT2BPETokenizer", "vocab_file": files["vocab_file"],
                "merge_file": files["merge_file"]}, None
    model = files["tokenizer_model"]
    # Megatron's plain SentencePiece kinds (its "SentencePieceTokenizer" adds special ids).
    if kind in ("GPTSentencePieceTokenizer", "Llama2Tokenizer") and model and os.path.isfile(model):
        return {"type": "SentencePieceTokenizer", "tokenizer_model": model}, None
    if kind == "HuggingFaceTokenizer" and model:
        path = os.path.join(model, "tokenizer.json") if os.path.isdir(model) else model
        if os.path.isfile(path) and path.endswith(".json"):
            return {"type": "HuggingFaceTokenizer", "tokenizer_model": path}, None
    why = (f"its tokenizer ({kind}, {', '.join(f'{k}={v}' for k, v in files.items() if v) or 'no files'}) "
           f"is not available here")
    return None, why


def config_from_args(args, where, legacy=False):
    """Our Config for Megatron-LM ``args``: the model section from its shape and options
    (``legacy``: see ``megatron_activation``), and the training settings that mean the
    same here (seed, precision, batch sizes, iterations, optimizer, data). The tokenizer
    section is left to the caller."""
    from megatron.config import Config
    pos = check_supported(args, where)
    cfg = Config()
    m, t, o, d = cfg.model, cfg.training, cfg.optimizer, cfg.data
    h = int(args.hidden_size)
    m.num_layers, m.hidden_size = int(args.num_layers), h
    m.num_attention_heads = int(args.num_attention_heads)
    # Explicit, as a training run's saved (finalized) config has it.
    m.ffn_hidden_size = int(_get(args, "ffn_hidden_size", 4 * h))
    m.seq_length = int(args.seq_length)
    m.max_position_embeddings = int(_get(args, "max_position_embeddings", m.seq_length))
    m.make_vocab_size_divisible_by = int(_get(args, "make_vocab_size_divisible_by", 128))
    m.hidden_dropout = float(_get(args, "hidden_dropout", 0.1))
    m.attention_dropout = float(_get(args, "attention_dropout", 0.1))
    m.init_method_std = float(_get(args, "init_method_std", 0.02))
    m.layernorm_epsilon = float(_get(args, "norm_epsilon", _get(args, "layernorm_epsilon", 1e-5)))
    m.position_embedding_type = "rope" if pos == "rope" else "learned"
    m.rotary_base = int(_get(args, "rotary_base", 10000))
    m.rotary_percent = float(_get(args, "rotary_percent", 1.0))
    m.normalization = _get(args, "normalization", "LayerNorm")
    m.activation = megatron_activation(args, legacy)
    groups = query_groups(args)
    m.num_query_groups = None if groups == m.num_attention_heads else groups
    m.add_bias_linear = bool(_get(args, "add_bias_linear", True))
    m.untie_embeddings_and_output_weights = bool(
        _get(args, "untie_embeddings_and_output_weights", False))
    t.seed = int(_get(args, "seed", t.seed))
    t.precision = next((ours for flag, ours in _PRECISIONS if _get(args, flag, False)), "fp32")
    t.micro_batch_size = int(_get(args, "micro_batch_size", t.micro_batch_size))
    t.global_batch_size = _get(args, "global_batch_size", None)
    t.train_iters = _get(args, "train_iters", None)
    for name in ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                 "clip_grad"):
        if getattr(args, name, None) is not None:
            setattr(o, name, float(getattr(args, name)))
    o.lr_warmup_iters = int(_get(args, "lr_warmup_iters", o.lr_warmup_iters))
    o.lr_decay_iters = _get(args, "lr_decay_iters", None)
    if _get(args, "lr_decay_style") in _DECAY_STYLES:
        o.lr_decay_style = args.lr_decay_style
    if getattr(args, "data_path", None):
        d.data_path = [str(x) for x in args.data_path]
    if isinstance(getattr(args, "split", None), str):
        d.split = args.split
    return cfg


def scheduler_state(args, iteration):
    """Our scheduler state for an imported checkpoint: the step count is the iteration
    (Megatron-LM counts its scheduler steps in samples)."""
    return {"max_lr": float(_get(args, "lr", 0.0)), "min_lr": float(_get(args, "min_lr", 0.0)),
            "warmup_steps": int(_get(args, "lr_warmup_iters", 0)),
            "decay_steps": _get(args, "lr_decay_iters", None),
            "decay_style": _get(args, "lr_decay_style", None), "num_steps": int(iteration)}


def args_from_config(config, tp, pp, vp, padded_vocab, true_vocab, iteration, consumed_samples,
                     transformer_impl):
    """The Namespace Megatron-LM needs to load an exported checkpoint (``config``: our
    config dict) at TP x PP (x VP)."""
    m = config.get("model") or {}
    t = config.get("training") or {}
    o = config.get("optimizer") or {}
    tok = config.get("tokenizer") or {}
    h, heads = int(m["hidden_size"]), int(m["num_attention_heads"])
    groups = m.get("num_query_groups") or heads
    activation = m.get("activation", "gelu_tanh")
    bias = bool(m.get("add_bias_linear", True))
    rope = m.get("position_embedding_type", "learned") == "rope"
    precision = t.get("precision", "fp32")
    if activation == "gelu_tanh" and not bias:
        raise CheckpointError("model.activation=gelu_tanh with add_bias_linear=false has no "
                              "Megatron-Core form (its tanh GeLU is the bias-GeLU fusion, which "
                              "needs biases)")
    ns = argparse.Namespace(
        num_layers=int(m["num_layers"]), hidden_size=h, num_attention_heads=heads,
        ffn_hidden_size=int(m.get("ffn_hidden_size") or 4 * h), kv_channels=h // heads,
        group_query_attention=groups != heads, num_query_groups=groups if groups != heads else 1,
        seq_length=int(m["seq_length"]),
        max_position_embeddings=int(m.get("max_position_embeddings") or m["seq_length"]),
        position_embedding_type="rope" if rope else "learned_absolute",
        # Megatron-LM's defaults: neither flag says which positions (position_embedding_type
        # does), and check_checkpoint_args compares add_position_embedding with the run's.
        add_position_embedding=True, use_rotary_position_embeddings=False,
        rotary_base=int(m.get("rotary_base", 10000)),
        rotary_percent=float(m.get("rotary_percent", 1.0)), rotary_interleaved=False,
        normalization=m.get("normalization", "LayerNorm"),
        norm_epsilon=float(m.get("layernorm_epsilon", 1e-5)),
        layernorm_epsilon=float(m.get("layernorm_epsilon", 1e-5)),
        apply_layernorm_1p=False, apply_residual_connection_post_layernorm=False,
        apply_query_key_layer_scaling=False, qk_layernorm=False, num_experts=None,
        add_bias_linear=bias, add_qkv_bias=bias, squared_relu=False,
        swiglu=activation == "swiglu",
        # Megatron-Core's tanh GeLU is its bias-GeLU fusion; without it, the exact GeLU.
        bias_gelu_fusion=activation == "gelu_tanh", bias_swiglu_fusion=activation == "swiglu",
        bias_activation_fusion=activation in ("gelu_tanh", "swiglu"), openai_gelu=False,
        untie_embeddings_and_output_weights=bool(m.get("untie_embeddings_and_output_weights",
                                                       False)),
        hidden_dropout=float(m.get("hidden_dropout", 0.1)),
        attention_dropout=float(m.get("attention_dropout", 0.1)),
        init_method_std=float(m.get("init_method_std", 0.02)),
        make_vocab_size_divisible_by=int(m.get("make_vocab_size_divisible_by", 128)),
        padded_vocab_size=int(padded_vocab),
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vp if vp > 1 else None,
        num_layers_per_virtual_pipeline_stage=(int(m["num_layers"]) // (pp * vp)
                                               if vp > 1 else None),
        fp16=precision == "fp16", bf16=precision == "bf16",
        params_dtype={"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32),
        seed=int(t.get("seed", 1234)),
        micro_batch_size=int(t.get("micro_batch_size", 1)),
        global_batch_size=t.get("global_batch_size"),
        lr=o.get("lr"), min_lr=o.get("min_lr"), weight_decay=o.get("weight_decay"),
        adam_beta1=o.get("adam_beta1"), adam_beta2=o.get("adam_beta2"), adam_eps=o.get("adam_eps"),
        clip_grad=o.get("clip_grad"), lr_decay_style=o.get("lr_decay_style"),
        lr_warmup_iters=o.get("lr_warmup_iters"),
        iteration=int(iteration), consumed_train_samples=int(consumed_samples),
        consumed_valid_samples=0, ckpt_format="torch", use_legacy_models=False,
        transformer_impl=transformer_impl, exported_by=_EXPORT_VERSION_NOTE,
    )
    ns.__dict__.update(_tokenizer_args(tok, true_vocab))
    return ns


def _tokenizer_args(tok, true_vocab):
    """Megatron-LM's tokenizer args for our tokenizer section."""
    kind = tok.get("type")
    out = {"tokenizer_type": kind, "vocab_file": None, "merge_file": None,
           "tokenizer_model": None, "vocab_size": None}
    if kind == "GPT2BPETokenizer":
        out.update(vocab_file=tok.get("vocab_file"), merge_file=tok.get("merge_file"))
    elif kind == "SentencePieceTokenizer":
        out.update(tokenizer_type="GPTSentencePieceTokenizer",
                   tokenizer_model=tok.get("tokenizer_model"))
    elif kind == "HuggingFaceTokenizer":
        out.update(tokenizer_model=tok.get("tokenizer_model"))
    else:  # NullTokenizer: its vocab_size is the ids before the end-of-document id
        out.update(tokenizer_type="NullTokenizer", vocab_size=int(true_vocab) - 1)
    return out
