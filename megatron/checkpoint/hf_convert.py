"""Export any checkpoint layout to a Hugging Face model directory and import one back (the logic
of tools/convert_hf.py), picking the family from the model: GPT-2's block goes to
GPT2LMHeadModel (hf_gpt2.py), Llama's (RoPE, RMSNorm, SwiGLU) to LlamaForCausalLM (hf_llama.py).
"""
import os

from megatron.checkpoint import hf_gpt2, hf_llama
from megatron.checkpoint.files import CheckpointError
from megatron.checkpoint.hf_files import (check_hf_state, import_tokenizer, read_hf_config,
                                          special_ids, write_hf_dir)
from megatron.checkpoint.reshard import WORD_EMBEDDINGS_KEY, CheckpointShards, merge_model_state

# config.json's model_type -> the mapping module; also the order export tries them in.
FAMILIES = {"gpt2": hf_gpt2, "llama": hf_llama}


def export_family(model_cfg, load_dir):
    """The mapping module whose model holds this checkpoint's block, or CheckpointError naming
    the options that differ from the nearest family."""
    found = {name: family.block_mismatches(model_cfg) for name, family in FAMILIES.items()}
    for name, mismatches in found.items():
        if not mismatches:
            return FAMILIES[name]
    name, mismatches = min(found.items(), key=lambda kv: len(kv[1]))
    wrong = ", ".join(f"model.{k}={v!r} (needs {w!r})" for k, v, w in mismatches)
    raise CheckpointError(f"checkpoint {load_dir} has {wrong}: no Hugging Face model holds this "
                          f"block (nearest: {name}; supported: GPT-2's and Llama's blocks)")


def export_to_hf(load_dir, save_dir, vocab_size=None, log=print):
    """Write ``save_dir`` (config.json, model.safetensors, tokenizer files) from a checkpoint of
    any TP / PP layout."""
    from megatron.checkpoint.convert import tokenizer_of
    shards = CheckpointShards(load_dir)
    model_cfg = shards.config.get("model") or {}
    family = export_family(model_cfg, load_dir)
    full = merge_model_state(shards)
    rows = full[WORD_EMBEDDINGS_KEY].shape[0]
    tok_cfg = shards.config.get("tokenizer") or {}
    tokenizer = tokenizer_of(shards.config)
    vocab = vocab_size or (tokenizer.vocab_size if tokenizer is not None else None)
    if vocab is None:
        raise CheckpointError(f"cannot build the tokenizer of {load_dir} to learn the vocabulary "
                              f"size; pass --vocab-size")
    if vocab > rows:
        raise CheckpointError(f"vocabulary size {vocab} exceeds the checkpoint's {rows} embedding rows")
    # Without its tokenizer, the end of document is taken to be the last id.
    bos, eos = special_ids(tok_cfg, tokenizer, vocab - 1)
    config, state, model_class, max_length = family.export_model(full, model_cfg, vocab, bos, eos)
    check_hf_state(model_class, config, state)
    tok_files = write_hf_dir(save_dir, config, state, tok_cfg if tokenizer is not None else {},
                             eos, max_length)
    log(f"exported {load_dir} (iteration {shards.iteration}, TP={shards.tp} PP={shards.pp}) to "
        f"{save_dir} as {model_class.__name__}: vocabulary {vocab} (unpadded from {rows}), "
        f"tokenizer files {tok_files or 'none (no tokenizer files to copy)'}")
    return save_dir


def import_from_hf(hf_dir, save_dir, tp=1, pp=1, divisible_by=None, seed=None, log=print):
    """Write a checkpoint (iteration 0, at TP x PP) from a local transformers GPT-2 or Llama
    directory. ``divisible_by`` and ``seed`` default to the config's
    ``model.make_vocab_size_divisible_by`` and ``training.seed``."""
    from megatron.checkpoint.convert import build_rank_files, write_checkpoint
    from megatron.config import Config
    raw = read_hf_config(hf_dir)
    kind = raw.get("model_type")
    if kind not in FAMILIES:
        raise CheckpointError(f"{hf_dir} holds a {kind!r} model; supported: "
                              f"{', '.join(FAMILIES)}")
    cfg = Config()
    if divisible_by is None:
        divisible_by = cfg.model.make_vocab_size_divisible_by
    if seed is not None:
        cfg.training.seed = seed
    cfg.model.make_vocab_size_divisible_by = divisible_by
    full, vocab = FAMILIES[kind].import_model(hf_dir, raw, cfg.model, divisible_by, tp)
    os.makedirs(save_dir, exist_ok=True)
    tok_kind = import_tokenizer(hf_dir, save_dir, cfg.tokenizer, vocab)
    cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size = tp, pp
    files = build_rank_files(cfg.to_dict(), 0, 0, full, tp, pp)
    out = write_checkpoint(save_dir, 0, files, pp)
    m = cfg.model
    log(f"imported {hf_dir} ({kind}) to {out}: {m.num_layers} layers, hidden {m.hidden_size}, "
        f"{m.num_attention_heads} heads ({m.query_groups()} query groups), vocabulary {vocab} "
        f"padded to {full[WORD_EMBEDDINGS_KEY].shape[0]}, TP={tp} PP={pp}, tokenizer {tok_kind}")
    return out
