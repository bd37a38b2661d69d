"""Read a checkpoint of any TP / PP layout, merge it into one full state, split it again.

The model's parameter names do not depend on the layout (global layer indices),
so merging is: concatenate each tensor-parallel tensor along its partition dim
over TP ranks, take replicated tensors from TP rank 0, and take the union of
the pipeline stages. Splitting is the reverse. Two details:

* The QKV projection's output columns are ordered per query group
  ([ng, np / ng + 2, hn]: the group's query heads, its key, its value; GPT-2's
  per-head [np, 3, hn] when ng = np), so a contiguous split of dim 0 gives each
  rank whole groups: no reordering needed.
* SwiGLU's ``dense_h_to_4h`` is [gate; up] in the full state and [gate_r; up_r]
  on TP rank r: split and merged with stride 2 (``partition_stride``), each half
  on its own. The partition rules therefore take the checkpoint's config.
* The word embedding (and the untied ``output_layer``) is padded to a multiple of
  ``make_vocab_size_divisible_by`` x TP. Merged states keep the source padding;
  ``resize_vocab`` adds zero rows or drops padding rows (never rows of real
  tokens) for another layout. The loss is unchanged even when the padded sizes
  differ: the model masks the logits of the padding ids (GPTModel's
  ``vocab_size``), so padding rows take no part in the softmax and their values
  do not matter.

The same rules apply to the Adam moments and fp32 master weights, which follow
their parameters.
"""
import os
import re

import torch

from megatron.checkpoint.files import (LATEST, MODEL_FILE, CheckpointError, iteration_dir,
                                       rank_dir_name, read_latest_iteration, shard_files)
from megatron.checkpoint.integrity import load_verified, read_manifest
from megatron.checkpoint.rank_state import model_states
from megatron.mpu import stride_merge, stride_shard
from megatron.optimizer import (HALF_DTYPES, clone_if_tensor, full_state_from_shards,
                                is_no_weight_decay)

# The state-dict keys of the (vocabulary-padded, TP-split) word embedding and of
# the untied output layer (model.untie_embeddings_and_output_weights).
WORD_EMBEDDINGS_KEY = "embedding.word_embeddings.weight"
OUTPUT_LAYER_KEY = "output_layer.weight"
VOCAB_KEYS = (WORD_EMBEDDINGS_KEY, OUTPUT_LAYER_KEY)

# Tensors split across TP ranks and their partition dim: column-parallel
# weights and biases along the output (dim 0), row-parallel weights along the
# input (dim 1), the vocab-parallel embedding and output layer along the vocabulary.
_PARTITION_DIMS = (
    (re.compile(r"\.self_attention\.query_key_value\.(weight|bias)$"), 0),
    (re.compile(r"\.mlp\.dense_h_to_4h\.(weight|bias)$"), 0),
    (re.compile(r"\.self_attention\.dense\.weight$"), 1),
    (re.compile(r"\.mlp\.dense_4h_to_h\.weight$"), 1),
    (re.compile(r"^embedding\.word_embeddings\.weight$"), 0),
    (re.compile(r"^output_layer\.weight$"), 0),
)
# Gated MLPs (SwiGLU): the input projection is two stacked blocks, [gate; up].
_GATED = re.compile(r"\.mlp\.dense_h_to_4h\.(weight|bias)$")
_LAYER = re.compile(r"^layers\.(\d+)\.")


def partition_dim(name):
    """The dim along which parameter ``name`` is split over TP ranks, None if replicated."""
    for pattern, dim in _PARTITION_DIMS:
        if pattern.search(name):
            return dim
    return None


def partition_stride(name, config=None):
    """How many stacked blocks tensor ``name`` splits block by block over TP (1: one plain
    contiguous split). 2 for SwiGLU's ``dense_h_to_4h`` ([gate; up] -> [gate_r; up_r])
    when ``config`` (a checkpoint's config dict or a Config) has ``model.activation: swiglu``."""
    if config is None or not _GATED.search(name):
        return 1
    if isinstance(config, dict):
        activation = (config.get("model") or {}).get("activation")
    else:
        activation = config.model.activation
    return 2 if activation == "swiglu" else 1


def layer_index(name):
    """The global transformer layer index of ``name``, None outside the layers."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


class CheckpointShards:
    """Every rank file of one saved iteration: ``files[(tp, pp)]`` is the loaded dict.

    Each file is verified against the iteration's manifest before it is unpickled
    (``verify=False`` skips the checksums), so a corrupt file is refused in one line
    naming it, never converted."""

    def __init__(self, root, iteration=None, verify=True):
        if not os.path.isdir(root):
            raise CheckpointError(f"checkpoint directory {root} does not exist")
        if iteration is None:
            iteration = read_latest_iteration(root)
            if iteration is None:
                raise CheckpointError(f"no checkpoint under {root} ({LATEST} is absent)")
        self.root, self.iteration, self.verify = root, iteration, verify
        it_dir = self.it_dir = iteration_dir(root, iteration)
        self.manifest = read_manifest(it_dir, verify)
        first = os.path.join(it_dir, rank_dir_name(0, 0, 1), MODEL_FILE)
        if not os.path.isfile(first):
            first = os.path.join(it_dir, rank_dir_name(0, 0, 2), MODEL_FILE)
        head = self.load(first)
        par = head.get("parallel") or {}
        self.tp = int(par.get("tensor_model_parallel_size", 1))
        self.pp = int(par.get("pipeline_model_parallel_size", 1))
        self.vp = int(par.get("virtual_pipeline_model_parallel_size") or 1)
        self.config = head.get("config") or {}
        self.files = {}
        for pp_rank in range(self.pp):
            for tp_rank in range(self.tp):
                path = os.path.join(it_dir, rank_dir_name(tp_rank, pp_rank, self.pp), MODEL_FILE)
                self.files[(tp_rank, pp_rank)] = (head if path == first else self.load(path))
        self.head = head

    def load(self, path):
        """Verify the file at ``path`` (inside this iteration's folder), then unpickle it."""
        rel = os.path.relpath(path, self.it_dir).replace(os.sep, "/")
        return load_verified(self.it_dir, rel, self.manifest, self.verify)

    def chunk_states(self, tp_rank, pp_rank):
        """The model state dicts of one rank file, one per virtual chunk."""
        return model_states(self.files[(tp_rank, pp_rank)], self.vp)

    def has_sharded_optimizer(self):
        """True when the optimizer state lives in per-DP-rank distributed-optimizer files."""
        return "optimizer" not in self.head and bool(
            (self.config.get("parallel") or {}).get("distributed_optimizer"))


def _merge_tensor(name, pieces, config=None):
    dim = partition_dim(name)
    if dim is None or len(pieces) == 1:
        return pieces[0]
    return stride_merge(pieces, dim, partition_stride(name, config))


def merge_model_state(shards):
    """One full (TP=1, PP=1) state dict from every rank file, in the model's name order.

    The word embedding keeps the source padding; the last stage's copy of the
    tied embedding is dropped (the first stage's is the same weight).
    """
    per_name = {}
    order = []
    for pp_rank in range(shards.pp):
        per_tp = [shards.chunk_states(t, pp_rank) for t in range(shards.tp)]
        for chunk in range(len(per_tp[0])):
            for name in per_tp[0][chunk]:
                if name in per_name:
                    continue  # the tied-embedding copy on the last stage
                try:
                    pieces = [per_tp[t][chunk][name] for t in range(shards.tp)]
                except KeyError:
                    raise CheckpointError(f"checkpoint {shards.root} iteration {shards.iteration}: "
                                          f"{name} is missing from some TP rank of stage {pp_rank}")
                per_name[name] = _merge_tensor(name, pieces, shards.config)
                order.append(name)
    return _canonical_order({n: per_name[n] for n in order})


def _sort_key(name):
    i = layer_index(name)
    if name.startswith("embedding."):
        return (0, 0, name.startswith("embedding.position"))
    if i is not None:
        return (1, i, 0)
    return (2, 0, 0)


def _canonical_order(state):
    # Stable sort: embedding first, then layers by global index, then the final
    # LayerNorm, each keeping the model's own order inside a layer.
    return dict(sorted(state.items(), key=lambda kv: _sort_key(kv[0])))


def resize_vocab_tensors(state, rows):
    """Re-pad, in the dict ``state``, each vocabulary tensor present (VOCAB_KEYS) to ``rows``."""
    for key in VOCAB_KEYS:
        if key in state:
            state[key] = resize_vocab(state[key], rows)
    return state


def resize_vocab(tensor, rows):
    """``tensor`` with ``rows`` rows along dim 0: zero rows appended, or trailing rows dropped."""
    n = tensor.shape[0]
    if rows == n:
        return tensor
    if rows < n:
        return tensor[:rows].clone()
    pad = torch.zeros((rows - n,) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
    return torch.cat([tensor, pad], dim=0)


def target_padded_vocab(true_vocab, divisible_by, tp):
    """Padded vocabulary size for ``tp`` ranks (a multiple of divisible_by x tp):
    the training rule, ``megatron.tokenizer.padded_vocab_size``."""
    from megatron.tokenizer.build import padded_vocab_size
    return padded_vocab_size(true_vocab, divisible_by, tp)


def chunk_names(full_names, num_layers, pp, vp, pp_rank, vp_rank):
    """The full-state names that model chunk (pp_rank, vp_rank) holds, in order."""
    from megatron.model.utils import stage_layer_range
    start, end = stage_layer_range(num_layers, pp, pp_rank, vp if vp > 1 else None, vp_rank)
    first = pp_rank == 0 and vp_rank == 0
    last = pp_rank == pp - 1 and vp_rank == vp - 1
    # The last stage keeps a copy of the word embedding only when it is the output layer.
    tied_copy = last and not first and OUTPUT_LAYER_KEY not in full_names
    names = []
    for n in full_names:
        i = layer_index(n)
        if i is not None:
            if start <= i < end:
                names.append(n)
        elif n.startswith("embedding."):
            if first or (tied_copy and n == WORD_EMBEDDINGS_KEY):
                names.append(n)
        elif last:
            names.append(n)
    if tied_copy:
        # The last stage's copy of the word embedding sits before its layers,
        # as in GPTModel (its embedding module is built first).
        names.remove(WORD_EMBEDDINGS_KEY)
        names.insert(0, WORD_EMBEDDINGS_KEY)
    return names


def split_tensor(name, tensor, tp, tp_rank, config=None):
    """TP rank ``tp_rank``'s shard of full tensor ``name`` (``config``: the checkpoint's,
    for the stride of SwiGLU's stacked [gate; up], see ``partition_stride``)."""
    dim = partition_dim(name)
    if dim is None or tp == 1:
        return tensor.clone()
    stride = partition_stride(name, config)
    size = tensor.shape[dim]
    if size % (tp * stride) != 0:
        raise CheckpointError(f"{name} has size {size} along dim {dim}, not divisible by "
                              f"tensor_model_parallel_size={tp}"
                              + (f" x {stride} stacked blocks" if stride > 1 else ""))
    return stride_shard(tensor, dim, tp, tp_rank, stride).clone()


def split_model_state(full, num_layers, tp, pp, vp=1, config=None):
    """``{(tp_rank, pp_rank): [chunk state dict per virtual chunk]}`` for the target layout.

    ``full`` must already have the target's vocabulary padding; ``config`` is the
    checkpoint's (``partition_stride``).
    """
    out = {}
    names = list(full)
    for pp_rank in range(pp):
        chunks_names = [chunk_names(names, num_layers, pp, vp, pp_rank, v) for v in range(vp)]
        for tp_rank in range(tp):
            out[(tp_rank, pp_rank)] = [{n: split_tensor(n, full[n], tp, tp_rank, config)
                                        for n in cn}
                                       for cn in chunks_names]
    return out


# ------------------------------------------------------------------ optimizer
def optimizer_param_order(chunk_states):
    """Names in the order of the optimizer's flat param index (decay group, then no-decay)."""
    decay, no_decay = [], []
    for state in chunk_states:
        for name, t in state.items():
            (no_decay if is_no_weight_decay(name, t) else decay).append(name)
    return decay, no_decay


def _numbered_groups(hyperparams, decay, no_decay):
    """The two param groups (saved hyperparameters) with the optimizer's flat param
    indices: the decay group's names first, then the no-decay group's."""
    groups, index = [], 0
    for g, names in zip(hyperparams, (decay, no_decay)):
        groups.append({**g, "params": list(range(index, index + len(names)))})
        index += len(names)
    return groups


def plain_state_from_distributed(shards, tp_rank, pp_rank):
    """The plain optimizer's ``state_dict()`` for rank file (tp_rank, pp_rank), rebuilt
    offline from its distributed-optimizer files (one per DP rank).

    Layout (mpu.distributed.GradBuffer): each model chunk has one grad buffer per
    (param dtype, grad dtype) pair holding its trainable params in
    ``parameters()`` order, i.e. the order of the chunk's state dict. Only
    single-dtype models (one buffer per chunk) are supported.
    """
    where = f"checkpoint {shards.root} rank {(tp_rank, pp_rank)}"
    rank_dir = os.path.join(iteration_dir(shards.root, shards.iteration),
                            rank_dir_name(tp_rank, pp_rank, shards.pp))
    files = shard_files(rank_dir) if os.path.isdir(rank_dir) else {}
    if not files:
        raise CheckpointError(f"{where} has no distrib_optim_dp_*.pt files in {rank_dir}")
    chunks = shards.chunk_states(tp_rank, pp_rank)
    dtypes = {t.dtype for st in chunks for t in st.values()}
    if len(dtypes) != 1:
        raise CheckpointError(f"{where}: distributed optimizer state of a model with params of "
                              f"dtypes {sorted(map(str, dtypes))} is not supported (one dtype only)")
    layout = {}  # name -> (buffer, start, end, shape): buffer b is chunk b's one buffer
    numels = []
    for b, st in enumerate(chunks):
        offset = 0
        for name, t in st.items():
            layout[name] = (b, offset, offset + t.numel(), t.shape)
            offset += t.numel()
        numels.append(offset)
    try:
        full = full_state_from_shards([shards.load(files[r]) for r in sorted(files)], numels)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    decay, no_decay = optimizer_param_order(chunks)
    order = decay + no_decay
    state = {}
    if full["step"] is not None:  # never stepped: no Adam state, as in a plain optimizer
        for idx, name in enumerate(order):
            b, lo, hi, shape = layout[name]
            state[idx] = {"step": clone_if_tensor(full["step"]),
                          "exp_avg": full["exp_avg"][b][lo:hi].view(shape).clone(),
                          "exp_avg_sq": full["exp_avg_sq"][b][lo:hi].view(shape).clone()}
    if len(full["param_groups"]) != 2:
        raise CheckpointError(f"{where}: {len(full['param_groups'])} optimizer param groups, "
                              f"expected 2 (weight decay, no weight decay)")
    groups = _numbered_groups(full["param_groups"], decay, no_decay)
    out = {"optimizer": {"state": state, "param_groups": groups},
           "grad_scaler": full["grad_scaler"]}
    if dtypes.pop() in HALF_DTYPES:
        # MixedPrecisionOptimizer keeps an fp32 master for every half-precision param.
        out["fp32_from_fp16_params"] = [
            full["param"][b][lo:hi].view(shape).clone()
            for b, lo, hi, shape in (layout[n] for n in order)]
    return out


def merge_optimizer_state(shards, full_model):
    """Full per-name optimizer state: ``{"params": {name: {key: tensor}}, "masters": {name:
    tensor}, "groups": [group hyperparameters], "grad_scaler": state}`` from the plain
    optimizer states of every rank file (a distributed optimizer's per-DP-rank files are
    first turned into the plain format by ``plain_state_from_distributed``)."""
    sharded = shards.has_sharded_optimizer()
    per_rank = {}
    for key, f in shards.files.items():
        if "optimizer" in f:
            per_rank[key] = f["optimizer"]
        elif sharded:
            per_rank[key] = plain_state_from_distributed(shards, *key)
        else:
            raise CheckpointError(f"checkpoint {shards.root} rank {key} has no optimizer state")
    named = {}  # name -> list over tp of {key: tensor}
    masters = {}
    groups = None
    for pp_rank in range(shards.pp):
        for tp_rank in range(shards.tp):
            opt = per_rank[(tp_rank, pp_rank)]
            inner = opt["optimizer"]
            decay, no_decay = optimizer_param_order(shards.chunk_states(tp_rank, pp_rank))
            order = decay + no_decay
            if groups is None:
                groups = [{k: v for k, v in g.items() if k != "params"}
                          for g in inner["param_groups"]]
            fp32_masters = opt.get("fp32_from_fp16_params")
            if fp32_masters is not None and len(fp32_masters) != len(order):
                raise CheckpointError(
                    f"checkpoint {shards.root} rank {(tp_rank, pp_rank)}: {len(fp32_masters)} fp32 "
                    f"master params for {len(order)} params (a mixed-dtype model is not supported)")
            for idx, name in enumerate(order):
                st = inner["state"].get(idx, inner["state"].get(str(idx)))
                if st is not None:
                    named.setdefault(name, {}).setdefault(tp_rank, st)
                if fp32_masters is not None:
                    masters.setdefault(name, {}).setdefault(tp_rank, fp32_masters[idx])
    params = {}
    for name in full_model:
        if name not in named:
            continue
        pieces = named[name]
        keys = pieces[0].keys()
        params[name] = {k: (_merge_tensor(name, [pieces[t][k] for t in range(shards.tp)],
                                          shards.config)
                            if torch.is_tensor(pieces[0][k]) and pieces[0][k].dim() > 0
                            else pieces[0][k]) for k in keys}
    merged_masters = {name: _merge_tensor(name, [m[t] for t in range(shards.tp)], shards.config)
                      for name, m in masters.items()}
    return {"params": params, "masters": merged_masters, "groups": groups,
            "grad_scaler": per_rank[(0, 0)].get("grad_scaler"),
            "has_masters": "fp32_from_fp16_params" in per_rank[(0, 0)]}


def resize_optimizer_vocab(opt, rows):
    """Re-pad the optimizer tensors of the vocabulary tensors (VOCAB_KEYS) to ``rows`` rows."""
    for key in VOCAB_KEYS:
        st = opt["params"].get(key)
        if st is not None:
            for k, v in st.items():
                if torch.is_tensor(v) and v.dim() > 0:
                    st[k] = resize_vocab(v, rows)
    resize_vocab_tensors(opt["masters"], rows)


def split_optimizer_state(opt, chunk_states, tp, tp_rank, config=None):
    """The optimizer ``state_dict()`` of one target rank holding ``chunk_states``
    (``config``: the checkpoint's, see ``partition_stride``)."""
    decay, no_decay = optimizer_param_order(chunk_states)
    order = decay + no_decay
    state = {}
    for idx, name in enumerate(order):
        st = opt["params"].get(name)
        if st is None:
            continue
        state[idx] = {k: (split_tensor(name, v, tp, tp_rank, config)
                          if torch.is_tensor(v) and v.dim() > 0
                          else clone_if_tensor(v)) for k, v in st.items()}
    groups = _numbered_groups(opt["groups"], decay, no_decay)
    out = {"optimizer": {"state": state, "param_groups": groups},
           "grad_scaler": opt["grad_scaler"]}
    if opt["has_masters"]:
        out["fp32_from_fp16_params"] = [split_tensor(n, opt["masters"][n], tp, tp_rank, config)
                                        for n in order if n in opt["masters"]]
    return out
