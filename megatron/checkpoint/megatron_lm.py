"""Megatron-LM checkpoints (per-rank `torch` format) in and out (tools/convert_megatron.py).

Import: `{root}/latest_checkpointed_iteration.txt` and
`{root}/iter_N/mp_rank_XX[_YYY]/model_optim_rng.pt` (or `release/`), written by
Megatron-LM with Megatron-Core names (local or Transformer Engine layer spec) or
legacy ones, at any TP x PP (x VP), become this project's checkpoint at any
layout. The model comes from the saved `args`; the weights are merged over the
source ranks and split again by the re-sharding rules (reshard.py). Optimizer
and RNG states are not carried over: training resumes with a fresh optimizer.

Export: any checkpoint of ours becomes Megatron-Core names in the same format,
with the args Megatron-LM checks on load.
"""
import os
import re
import shutil

from megatron.checkpoint.convert import build_rank_files, tokenizer_of, write_checkpoint
from megatron.checkpoint.files import (LATEST, MODEL_FILE, CheckpointError, atomic_write,
                                       iteration_dir, rank_dir_name, replace_dir,
                                       write_latest_iteration)
from megatron.checkpoint.megatron_args import (args_from_config, config_from_args,
                                               scheduler_state, tokenizer_section)
from megatron.checkpoint.megatron_names import (TRANSFORMER_IMPLS, expected_names, fix_old_qkv,
                                                flatten, is_legacy, local_layer_count,
                                                to_megatron_core, to_ours)
from megatron.checkpoint.megatron_safe_load import load_megatron_file
from megatron.checkpoint.reshard import (WORD_EMBEDDINGS_KEY, CheckpointShards, merge_model_state,
                                         resize_vocab_tensors, split_model_state,
                                         target_padded_vocab)

_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
CONFIG_FILE = "config.yaml"


def _read_tracker(root):
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        raise CheckpointError(f"{root} holds no Megatron-LM checkpoint ({LATEST} is absent)")
    text = open(path).read().strip()
    if text == "release":
        return "release", 0
    try:
        return None, int(text)
    except ValueError:
        raise CheckpointError(f"{path} holds {text!r}, neither an iteration nor 'release'") from None


class MegatronCheckpoint:
    """Every rank file of one Megatron-LM checkpoint iteration, loaded safely.

    ``files[(tp, pp)]`` is a loaded dict; ``args``, ``tp``, ``pp``, ``vp``,
    ``iteration``, ``checkpoint_version`` and ``legacy`` describe it. It also serves
    as the ``shards`` object of ``reshard.merge_model_state`` (``chunk_states`` gives
    each rank's chunks in our names with global layer indices)."""

    def __init__(self, root, iteration=None):
        if not os.path.isdir(root):
            raise CheckpointError(f"Megatron-LM checkpoint directory {root} does not exist")
        release, latest = _read_tracker(root) if iteration is None else (None, iteration)
        it_dir = os.path.join(root, release) if release else iteration_dir(root, latest)
        if not os.path.isdir(it_dir):
            raise CheckpointError(f"{it_dir} does not exist (named by {LATEST})")
        ranks = self._rank_dirs(it_dir)
        self.root, self.it_dir = root, it_dir
        self.tp = 1 + max(t for t, _ in ranks)
        self.pp = 1 + max(p for _, p in ranks)
        missing = [(t, p) for t in range(self.tp) for p in range(self.pp) if (t, p) not in ranks]
        if missing:
            raise CheckpointError(f"{it_dir} lacks the rank folder of TP rank {missing[0][0]}, "
                                  f"PP rank {missing[0][1]} (it holds TP={self.tp} x PP={self.pp})")
        self.files = {key: load_megatron_file(os.path.join(it_dir, name, MODEL_FILE))
                      for key, name in sorted(ranks.items())}
        head = self.files[(0, 0)]
        self.args = head.get("args")
        if self.args is None:
            raise CheckpointError(f"{it_dir} holds no saved args (the model shape comes from them)")
        self.iteration = int(head.get("iteration", latest) if not release else 0)
        self.checkpoint_version = float(head.get("checkpoint_version", 0))
        self._check_layout()
        self.vp = sum(1 for k in head if re.fullmatch(r"model\d+", k)) or 1
        self._flat = {key: [flatten(f.get(k) or {}) for k in self._chunk_keys()]
                      for key, f in self.files.items()}
        self.legacy = is_legacy(self._flat[(0, 0)][0])
        self.config = None  # set by the importer: the partition rules read model.activation
        self._offsets = self._layer_offsets()

    @staticmethod
    def _rank_dirs(it_dir):
        ranks = {}
        for name in os.listdir(it_dir):
            m = _RANK_DIR.match(name)
            if not m or not os.path.isfile(os.path.join(it_dir, name, MODEL_FILE)):
                continue
            if m.group(3) is not None:
                raise CheckpointError(f"{it_dir}/{name} is an expert-parallel rank (MoE), which "
                                      f"this model does not have")
            ranks[(int(m.group(1)), int(m.group(2) or 0))] = name
        if not ranks:
            dist = any(n.endswith((".distcp", ".metadata")) or n == "common.pt"
                       for n in os.listdir(it_dir))
            raise CheckpointError(
                f"{it_dir} holds no mp_rank_*/{MODEL_FILE}" +
                (" (it is a torch_dist checkpoint: convert it in Megatron-LM with "
                 "--ckpt-convert-format torch --ckpt-convert-save DIR first)" if dist else ""))
        return ranks

    def _check_layout(self):
        a = self.args
        tp = getattr(a, "tensor_model_parallel_size", None) or getattr(a, "model_parallel_size", 1)
        pp = getattr(a, "pipeline_model_parallel_size", None) or 1
        if (int(tp), int(pp)) != (self.tp, self.pp):
            raise CheckpointError(f"{self.it_dir} holds TP={self.tp} x PP={self.pp} rank folders "
                                  f"but its args say TP={tp} x PP={pp}")

    def _chunk_keys(self):
        return ["model"] if self.vp == 1 else [f"model{i}" for i in range(self.vp)]

    def _layer_offsets(self):
        # Megatron assigns layers to chunks contiguously in the order (virtual chunk,
        # then stage), evenly or not; each chunk's count is read from its names.
        offsets, start = {}, 0
        for v in range(self.vp):
            for p in range(self.pp):
                offsets[(p, v)] = start
                start += local_layer_count(self._flat[(0, p)][v])
        if start != int(self.args.num_layers):
            raise CheckpointError(f"{self.it_dir} holds {start} transformer layers but its args "
                                  f"say num_layers={self.args.num_layers}")
        return offsets

    def chunk_states(self, tp_rank, pp_rank):
        """The model chunks of one rank in our names, global layer indices."""
        untied = bool(getattr(self.args, "untie_embeddings_and_output_weights", False))
        where = f"{self.it_dir}/{rank_dir_name(tp_rank, pp_rank, self.pp)}"
        heads = int(self.args.num_attention_heads) // self.tp
        out = []
        for v, flat in enumerate(self._flat[(tp_rank, pp_rank)]):
            state = to_ours(flat, self._offsets[(pp_rank, v)], untied, where)
            if self.legacy and self.checkpoint_version < 2:
                for name in state:
                    if ".query_key_value." in name:
                        state[name] = fix_old_qkv(state[name], self.checkpoint_version, heads)
            out.append(state)
        return out


def _check_names(full, model_cfg, where):
    want = expected_names(model_cfg)
    missing = [n for n in want if n not in full]
    extra = [n for n in full if n not in want]
    if missing or extra:
        raise CheckpointError(f"{where} does not match the model its args describe: missing "
                              f"{missing[:3]}, unexpected {extra[:3]}")
    return {n: full[n] for n in want}


def import_from_megatron(load_dir, save_dir, tp=1, pp=1, vp=1, iteration=None, vocab_size=None,
                         log=print):
    """Write our checkpoint (Megatron's iteration, at TP x PP x VP) and its config as
    ``save_dir/config.yaml`` from the Megatron-LM checkpoint under ``load_dir``."""
    if os.path.abspath(load_dir) == os.path.abspath(save_dir):
        raise CheckpointError(f"--save-dir {save_dir} must differ from --load-dir {load_dir}")
    src = MegatronCheckpoint(load_dir, iteration)
    args = src.args
    cfg = config_from_args(args, src.it_dir, src.legacy)
    tok, why = tokenizer_section(args)
    for key, value in (tok or {}).items():
        setattr(cfg.tokenizer, key, value)
    src.config = cfg.to_dict()
    full = _check_names(merge_model_state(src), src.config["model"], src.it_dir)
    rows = full[WORD_EMBEDDINGS_KEY].shape[0]
    tokenizer = tokenizer_of(src.config) if why is None else None
    true_vocab = vocab_size or (tokenizer.vocab_size if tokenizer is not None else None)
    if true_vocab is None:
        true_vocab = rows
        cfg.tokenizer.type, cfg.tokenizer.vocab_size = "NullTokenizer", rows - 1
        log(f"warning: {why}; using a NullTokenizer of its {rows} embedding rows (pass "
            f"--vocab-size and set the tokenizer section of {CONFIG_FILE} to yours)")
    elif why is not None:
        cfg.tokenizer.type, cfg.tokenizer.vocab_size = "NullTokenizer", true_vocab - 1
        log(f"warning: {why}; config.yaml names a NullTokenizer of {true_vocab} ids: set its "
            f"tokenizer section to yours")
    if true_vocab > rows:
        raise CheckpointError(f"vocabulary size {true_vocab} exceeds the checkpoint's {rows} "
                              f"embedding rows")
    padded = target_padded_vocab(true_vocab, cfg.model.make_vocab_size_divisible_by, tp)
    resize_vocab_tensors(full, padded)
    par = cfg.parallel
    par.tensor_model_parallel_size, par.pipeline_model_parallel_size = tp, pp
    par.virtual_pipeline_model_parallel_size = vp if vp > 1 else None
    config = cfg.to_dict()
    consumed = int(getattr(args, "consumed_train_samples", 0) or 0)
    files = build_rank_files(config, src.iteration, consumed, full, tp, pp, vp,
                             scheduler_state=scheduler_state(args, src.iteration))
    out = write_checkpoint(save_dir, src.iteration, files, pp)
    atomic_write(os.path.join(save_dir, CONFIG_FILE), cfg.to_yaml())
    m = cfg.model
    log(f"imported {src.it_dir} ({'legacy Megatron-LM' if src.legacy else 'Megatron-Core'} "
        f"names, TP={src.tp} PP={src.pp} VP={src.vp}) to {out}: {m.num_layers} layers, hidden "
        f"{m.hidden_size}, {m.num_attention_heads} heads, activation {m.activation}, vocabulary "
        f"{true_vocab} padded {rows} -> {padded}, TP={tp} PP={pp} VP={vp}; config in "
        f"{os.path.join(save_dir, CONFIG_FILE)}")
    log("optimizer and RNG states are not imported: training resumes from these weights "
        "with a fresh optimizer")
    return out


def export_to_megatron(load_dir, save_dir, tp=None, pp=None, vp=None, iteration=None,
                       transformer_impl="transformer_engine", log=print):
    """Write a Megatron-LM checkpoint (Megatron-Core names for ``transformer_impl``'s layer
    spec, per-rank torch format) from our checkpoint of any layout; the target layout
    defaults to the source's. Returns the written iteration directory."""
    if transformer_impl not in TRANSFORMER_IMPLS:
        raise CheckpointError(f"transformer_impl={transformer_impl!r} is not one of "
                              f"{', '.join(TRANSFORMER_IMPLS)}")
    if os.path.abspath(load_dir) == os.path.abspath(save_dir):
        raise CheckpointError(f"--save-dir {save_dir} must differ from --load-dir {load_dir}")
    shards = CheckpointShards(load_dir, iteration)
    tp, pp, vp = tp or shards.tp, pp or shards.pp, vp or shards.vp
    if min(tp, pp, vp) < 1:
        raise CheckpointError(f"target sizes must be >= 1, got TP={tp} PP={pp} VP={vp}")
    config = shards.config
    model_cfg = config.get("model") or {}
    full = merge_model_state(shards)
    rows = full[WORD_EMBEDDINGS_KEY].shape[0]
    tokenizer = tokenizer_of(config)
    true_vocab = min(tokenizer.vocab_size, rows) if tokenizer is not None else rows
    padded = target_padded_vocab(true_vocab, model_cfg.get("make_vocab_size_divisible_by", 128), tp)
    resize_vocab_tensors(full, padded)
    from megatron.model.utils import stage_layer_range
    num_layers = int(model_cfg["num_layers"])
    if num_layers % (pp * vp) or int(model_cfg["num_attention_heads"]) % tp:
        raise CheckpointError(f"{num_layers} layers and {model_cfg['num_attention_heads']} heads "
                              f"do not divide into TP={tp} x PP={pp} x VP={vp}")
    split = split_model_state(full, num_layers, tp, pp, vp, config=config)
    args = args_from_config(config, tp, pp, vp, padded, true_vocab, shards.iteration,
                            shards.head.get("consumed_samples", 0), transformer_impl)
    untied = bool(model_cfg.get("untie_embeddings_and_output_weights", False))
    final = iteration_dir(save_dir, shards.iteration)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for (tp_rank, pp_rank), chunks in split.items():
        state = {"args": args, "checkpoint_version": 3.0, "iteration": shards.iteration,
                 "num_floating_point_operations_so_far": 0}
        for v, chunk in enumerate(chunks):
            start, _ = stage_layer_range(num_layers, pp, pp_rank, vp if vp > 1 else None, v)
            first, last = pp_rank == 0 and v == 0, pp_rank == pp - 1 and v == vp - 1
            state["model" if vp == 1 else f"model{v}"] = to_megatron_core(
                chunk, start, first, last, untied, transformer_impl)
        rank_dir = os.path.join(tmp, rank_dir_name(tp_rank, pp_rank, pp))
        os.makedirs(rank_dir, exist_ok=True)
        atomic_write(os.path.join(rank_dir, MODEL_FILE), state)
    os.makedirs(save_dir, exist_ok=True)
    replace_dir(tmp, final)
    write_latest_iteration(save_dir, shards.iteration)
    log(f"exported {load_dir} (iteration {shards.iteration}, TP={shards.tp} PP={shards.pp}) to "
        f"{final}: Megatron-Core names ({transformer_impl} layer spec), TP={tp} PP={pp} VP={vp}, "
        f"vocabulary {true_vocab} padded to {padded}; load it in Megatron-LM with --load "
        f"{save_dir} --ckpt-format torch --no-load-optim --no-load-rng")
    return final
