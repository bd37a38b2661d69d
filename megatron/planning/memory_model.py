"""Analytic memory model: the peak tensor bytes of each pipeline rank of a layout.

Read off this code, not a paper: what each module saves for backward, what the
DDP grad buffer, the optimizers and the schedules keep (see docs/scaling.md for
the equations and their validation against measured CPU runs). Two devices
differ only in kernels: on ``cpu`` dropout keeps a mask in the activation
dtype and attention with dropout runs SDPA's math path (it keeps the s x s
scores, their dropout mask and the dropped scores in fp32); on ``cuda`` the
fused dropout kernels keep a 1-byte mask, the Triton LayerNorm fp32 statistics,
and SDPA's flash kernel no s x s tensor at all.

Bytes of one rank = static (parameters, DP grad buffer, fp32 masters, Adam
moments) + the most it holds at once during a step: the activations of the
micro batches the schedule keeps in flight, plus the largest transient on top
(the logits and loss buffers of the last stage, one layer's backward, a
recomputed layer, the optimizer's temporaries).
"""
from dataclasses import dataclass, field

from megatron.planning.layout import DTYPE_BYTES
from megatron.schedule_plan import num_warmup_forwards

INT64 = 8


@dataclass
class RankMemory:
    """Bytes on one pipeline rank: the static parts, the activations held at the peak,
    the transient on top of them, and ``total``; ``detail`` names the peak moment."""
    pipeline_rank: int
    params: int
    grads: int
    masters: int
    optimizer_state: int
    activations: int
    transient: int
    in_flight: int
    detail: str = ""
    parts: dict = field(default_factory=dict)
    moments: dict = field(default_factory=dict)  # each candidate peak moment's transient

    @property
    def schedule_peak(self):
        """The most the forward / backward schedule holds above the static bytes: the held
        activations plus the largest transient before the optimizer step."""
        return self.activations + max(v for k, v in self.moments.items() if k != "optimizer step")

    @property
    def static(self):
        """What persists between steps."""
        return self.params + self.grads + self.masters + self.optimizer_state

    @property
    def total(self):
        """The predicted peak."""
        return self.static + self.activations + self.transient


def stage_params(shape, layout, rank):
    """Parameters held by pipeline rank ``rank`` (all its model chunks, one TP shard)."""
    t, p = layout.tp, layout.pp
    n = shape.num_layers // p * shape.layer_params(t)
    if rank == 0:
        n += shape.first_stage_params(t)
    if rank == p - 1:
        n += shape.last_stage_params(t, p)
    return n


def static_bytes(shape, layout, rank):
    """``(params, grads, masters, optimizer_state)`` bytes of pipeline rank ``rank``.

    The DDP grad buffer is fp32 with ``grad_fp32`` (else the param dtype), padded to a
    multiple of DP; fp16/bf16 params get fp32 masters; Adam keeps two fp32 moments per
    master. The distributed optimizer keeps masters and moments for its 1/DP shard only
    (its parameters become views into a flat buffer of the same size).
    """
    n = stage_params(shape, layout, rank)
    d = layout.dtype_bytes
    padded = -(-n // layout.dp) * layout.dp
    grads = padded * (4 if layout.grad_fp32 else d)
    owned = padded // layout.dp if layout.distributed_optimizer else n
    masters = 4 * owned if layout.precision != "fp32" else 0
    return n * d, grads, masters, 8 * owned


# Whose kernels count, per device name: (attention, element-wise ops).
#   cpu:     CPU's SDPA (flash, or the math path with dropout); ATen's CPU kernels.
#   cuda:    SDPA's flash / memory-efficient kernel; the Triton and compiled fusions.
#   dry-run: what ``megatron.dryrun.dry_run(target="cuda")`` runs on fake CPU tensors: CUDA's
#            attention kernel, every other op as on the CPU (it does not emulate Triton).
KERNELS = {"cpu": ("cpu", "cpu"), "cuda": ("cuda", "cuda"), "dry-run": ("cuda", "cpu")}


def _kernels(device):
    if device not in KERNELS:
        raise ValueError(f"device {device!r} is not one of {', '.join(KERNELS)}")
    return KERNELS[device]


def _mask_bytes(device, d):
    # CPU dropout keeps its mask in the activation dtype; the CUDA kernels keep bools.
    return d if _kernels(device)[1] == "cpu" else 1


def _norm_bytes(shape, device, d):
    """What one norm keeps beyond its input and output: ``(bytes per row, bytes per
    element)``. LayerNorm: mean and rstd per row (ATen's CPU kernel in the input dtype).
    RMSNorm: rstd per row (fp32); ATen's CPU ``rms_norm`` also keeps the fp32 product
    x * rstd (for the weight's grad) and, for fp16/bf16 input, its fp32 upcast of x;
    the Triton kernel keeps only its input."""
    cpu = _kernels(device)[1] == "cpu"
    if shape.normalization == "RMSNorm":
        return 4, (4 + (4 if d != 4 else 0)) if cpu else 0
    return 2 * (d if cpu else 4), 0


def _norm_keeps_input(shape, device, d):
    """Whether a norm keeps its input for backward: all do but ATen's CPU ``rms_norm`` on
    fp16/bf16, which keeps its fp32 upcast instead (then nothing keeps the attention
    residual or a layer's output: the residual adds do not need them for backward)."""
    return not (shape.normalization == "RMSNorm" and _kernels(device)[1] == "cpu" and d != 4)


def mlp_activation_bytes(shape, device, d):
    """Bytes per token the MLP's activation keeps on one TP rank, times TP: its input (the
    first linear's output) and output. SwiGLU's reference (CPU) keeps the fp32 [gate, up]
    (the input itself when fp32), silu(gate) in fp32 and the output; its Triton kernel
    (CUDA) the input and the output."""
    f = shape.ffn_hidden_size
    if not shape.gated:
        return 2 * f * d
    if _kernels(device)[1] == "cpu":
        return (8 + 4 + d) * f
    return 3 * f * d


def layer_activation_bytes(shape, layout, device="cuda"):
    """Bytes one transformer layer keeps for backward, per micro batch, by part:
    ``replicated`` (what every TP rank holds whole unless sequence parallel: norm inputs /
    outputs and what the norms keep, residual dropout masks), ``split`` (divided over TP:
    QKV, rotated q and k, attention output, MLP), ``attention_core`` (what SDPA keeps
    beyond its q, k, v inputs), ``selective_inputs`` (what a selective recompute keeps
    beyond ``split``) and ``checkpoint`` (the layer input a full recompute keeps instead).
    ``device``: whose kernels count, a key of ``KERNELS``."""
    attention_kernel, _ = _kernels(device)
    t, d = layout.tp, layout.dtype_bytes
    s, b, h = shape.seq_length, layout.micro_batch, shape.hidden_size
    a = shape.num_attention_heads
    sb, sbh = s * b, s * b * h
    rep = 1 / t if layout.sequence_parallel else 1
    m = _mask_bytes(device, d) if shape.dropout else 0
    norm_row, norm_elem = _norm_bytes(shape, device, d)
    # Two norms (their outputs, the linears' inputs, and what each keeps), the attention
    # residual (post-attention norm input), the layer output (next layer's input), two
    # residual dropout masks.
    inputs = 2 * d if _norm_keeps_input(shape, device, d) else 0
    replicated = rep * (sbh * (2 * d + inputs + 2 * m + 2 * norm_elem) + 2 * sb * norm_row)
    # QKV output (q, k, v are views of it; K and V of the query groups only), RoPE's
    # rotated q and k (new tensors), the attention output made contiguous for the dense
    # layer, the MLP's activation input and output.
    qkv = sb * (h + 2 * shape.kv_size) * d / t
    rotated = sb * (h + shape.kv_size) * d / t if shape.rope else 0
    split = qkv + rotated + (sbh * d + sb * mlp_activation_bytes(shape, device, d)) / t
    lse = 4 * b * a * s / t
    selective_inputs = 0  # what a selective recompute keeps beyond ``split``: q, k, v
    if attention_kernel == "cpu" and shape.dropout:
        # SDPA's math path (CPU, dropout on): q and k scaled / transposed fp32 copies, v as an
        # fp32 copy unless fp32 already (then it is a view of the QKV output); the scores'
        # softmax, dropout mask and dropped scores, fp32. (With grouped-query attention the
        # math path's K/V are counted at the groups' width: not validated.)
        kv = shape.kv_size
        core = sb * (4 * h + 4 * kv + (0 if d == 4 else 4 * kv)) / t + 12 * b * a * s * s / t
        # The rotated q and k are not kept then (their fp32 copies are)...
        split -= rotated
        selective_inputs = rotated  # ...but the recompute keeps them
        if d != 4:
            split -= qkv  # nor is the QKV output itself...
            selective_inputs += qkv  # ...but the recompute keeps it
    elif attention_kernel == "cpu":
        core = lse  # flash kernel on CPU: the log-sum-exp; its output is the dense input
    else:
        core = sbh * d / t + lse  # flash kernel: its output and the log-sum-exp
    return {"replicated": replicated, "split": split, "attention_core": core,
            "selective_inputs": selective_inputs, "checkpoint": rep * sbh * d}


def layer_bytes(parts, recompute):
    """Held bytes of one layer per micro batch under ``recompute``: a full recompute keeps
    the layer input only, a selective one everything but the attention core (recomputed
    from its q, k, v, views of the QKV output)."""
    if recompute == "full":
        return parts["checkpoint"]
    if recompute == "selective":
        return parts["replicated"] + parts["split"] + parts["selective_inputs"]
    return parts["replicated"] + parts["split"] + parts["attention_core"]


def in_flight(layout, rank):
    """(chunk, micro batch) forwards whose activations pipeline rank ``rank`` holds at most
    at once: 1 without pipelining; min(p - rank, m) in 1F1B; in the interleaved schedule
    the warm-up forwards plus one (all m x v when m = p)."""
    p, v, m = layout.pp, layout.vp, layout.num_microbatches
    if p == 1:
        return 1
    if v == 1:
        return min(p - rank, m)
    total = m * v
    if m == p:
        return total
    return min(2 * (p - rank - 1) + (v - 1) * p + 1, total)


def p2p_tensors(layout, rank):
    """``[s, b, h]`` tensors the pipeline schedules hold on rank ``rank`` beyond the micro
    batches in flight and what the moment's own backward counts, per peak moment (read
    off ``schedules.py``). A backward starts from the output grad received for it (a
    layer's backward counts it as the grad of its output), which stays bound until the
    chunk's backward returns: the embedding's backward, at its end, still sits on it. The
    previous backward's input grad, sent, stays bound to the loop's variable until this
    backward returns (the first rank's first chunk has no input grad: 1F1B's first rank
    never holds one; the interleaved first rank does when a chunk-0 backward follows
    chunk 1's, which the peak has). The interleaved schedule runs a step's forward and
    backward before the one exchange that sends both, so a steady-state backward also
    sits on that forward's output, not yet sent and released (1F1B sends it first); on
    the last rank a loss forward / backward shares its step with a loss backward /
    forward (no received grad, no output to send)."""
    p, v, m = layout.pp, layout.vp, layout.num_microbatches
    if p == 1:
        return {"layer backward": 0, "embedding backward": 0, "loss forward": 0,
                "loss backward": 0}
    first = rank == 0
    if v == 1:
        # 1F1B: the previous backward's grad is bound from the second steady step on.
        steady = m - min(p - rank - 1, m)
        prev = 1 if not first and steady >= 2 else 0
        return {"layer backward": prev, "embedding backward": 1 + prev, "loss forward": prev,
                "loss backward": prev}
    unsent = 1 if m * v > num_warmup_forwards(p, v, rank, m) else 0  # a steady state
    return {"layer backward": 1 + unsent, "embedding backward": 2 + unsent,
            "loss forward": unsent, "loss backward": 1}


def rank_memory(shape, layout, rank, device="cuda"):
    """The predicted peak of pipeline rank ``rank`` as a ``RankMemory``."""
    t, p, v, d = layout.tp, layout.pp, layout.vp, layout.dtype_bytes
    s, b, h = shape.seq_length, layout.micro_batch, shape.hidden_size
    sbh = s * b * h
    rep = 1 / t if layout.sequence_parallel else 1
    params, grads, masters, opt = static_bytes(shape, layout, rank)
    parts = layer_activation_bytes(shape, layout, device)
    per_layer = layer_bytes(parts, layout.recompute)
    layers_per_chunk = shape.num_layers // (p * v)
    m_bytes = _mask_bytes(device, d) if shape.dropout else 0
    first, last = rank == 0, rank == p - 1
    vocab_t = shape.padded_vocab(t) // t

    # What one (chunk, micro batch) forward keeps: its layers, and its input (the
    # embedding output and dropout mask with the token ids, or the received tensor).
    # A non-last chunk's output is released once sent, so its last layer's output is not.
    chunk = layers_per_chunk * per_layer
    if shape.rope:
        chunk += 2 * 4 * s * b * shape.rotary_dim  # the chunk's RoPE cos and sin, fp32
    ids = 3 * b * s * INT64 + (2 * b * s * INT64 if t > 1 else 0)  # tokens, labels, positions
    embed_input = rep * sbh * (d + m_bytes) + ids
    recv_input = rep * sbh * d
    released = rep * sbh * d if _norm_keeps_input(shape, device, d) else 0
    flights = in_flight(layout, rank)
    # Chunks of this rank in flight: with interleaving they cycle over the v chunks; the
    # first rank's chunk 0 reads data, the last rank's last chunk ends in the loss.
    held = 0.0
    for k in range(flights):
        c = (k // p) % v if v > 1 else 0
        is_first_chunk = first and c == 0
        is_last_chunk = last and c == v - 1
        held += chunk + (embed_input if is_first_chunk else recv_input)
        if not is_last_chunk:
            held -= released
    # One layer's backward, MLP first: the grads of its output and residual, of the
    # activation's output and one weight grad (each saved tensor is freed once its node has run). Then
    # the attention, after the MLP's activations are gone: the recomputed core (selective)
    # and the grads of its s x s scores (math path) or of q, k, v (flash).
    # A full recompute first rebuilds the whole layer on top of the held inputs.
    f, a = shape.ffn_hidden_size, shape.num_attention_heads
    norm_row, norm_elem = _norm_bytes(shape, device, d)
    mlp_held = (rep * sbh * (d + m_bytes + norm_elem)
                + s * b * mlp_activation_bytes(shape, device, d) / t)
    # The down projection's grads of its input and weight; SwiGLU's own backward then holds
    # more (its reference: the fp32 grad of its output and those of silu(gate) and up, while
    # its output is freed; Triton: the grad of its input).
    mlp_bwd = d * (2 * rep * sbh + s * b * f / t + f * h / t)
    if shape.gated:
        act_bwd = (12 - d) * f if _kernels(device)[1] == "cpu" else 2 * f * d
        mlp_bwd = max(mlp_bwd, d * 2 * rep * sbh + s * b * act_bwd / t)
    if _kernels(device)[0] == "cpu" and shape.dropout:
        core_bwd = 4 * b * a * s * s / t + d * sbh / t
    else:
        core_bwd = d * s * b * (h + 2 * shape.kv_size) / t  # grads of q, k, v
    full_layer = parts["replicated"] + parts["split"] + parts["attention_core"]
    rebuilt = {"full": full_layer - parts["checkpoint"],
               "selective": parts["attention_core"] - parts["selective_inputs"],
               "none": 0}[layout.recompute]
    if layout.recompute == "full":
        layer_bwd = rebuilt + max(mlp_bwd, core_bwd - mlp_held)
    else:
        layer_bwd = max(mlp_bwd, rebuilt + core_bwd - mlp_held)
    # The pipeline's sent / received / unsent [s, b, h] tensors at each moment (p2p_tensors).
    boundary = rep * sbh * d
    p2p = {k: n * boundary for k, n in p2p_tensors(layout, rank).items()}
    moments = {"layer backward": layer_bwd + p2p["layer backward"]}
    if last:
        sbv = s * b * vocab_t
        # Final norm output (gathered whole for the logits with sequence parallelism) and
        # what the norm keeps.
        if shape.normalization == "RMSNorm":
            head = sbh * d + rep * (s * b * norm_row + sbh * norm_elem)
        else:
            head = sbh * d + rep * 4 * s * b * (d if _kernels(device)[1] == "cpu" else 4)
        # The cross entropy's fp32 logits minus their max: fp32 logits are shifted in place;
        # fp16/bf16 ones are upcast (a temporary) and the shift is a third buffer.
        inplace = d == 4
        moments["loss forward"] = head + sbv * (4 if inplace else d + 8) + p2p["loss forward"]
        # Backward of the loss: the fp32 softmax becomes the logits' grad (cast to the
        # dtype), then the output layer's grads of its input and weight.
        moments["loss backward"] = head + max(sbv * (4 if inplace else 4 + d),
                                              sbv * d + sbh * d + vocab_t * h * d)
        moments["loss backward"] += p2p["loss backward"]
        if p == 1 and not shape.untied:
            # Tied embedding on one stage: the output layer's weight grad waits for the
            # embedding's before the grad hook runs; it spans the whole backward.
            moments["layer backward"] += vocab_t * h * d
    if first:
        # The word embedding's backward, at the end of a micro batch's backward through
        # chunk 0 (its layers freed, the other micro batches in flight still held): the
        # grad of the embedding output (whole [s, b, h]: the sequence-parallel scatter's
        # backward gathers it) and the dense [V / t, h] grad of the embedding table, in the
        # param dtype, before it is added to the grad buffer. With a tied output layer on
        # one stage the output layer's weight grad still waits too.
        tied_wait = vocab_t * h * d if p == 1 and not shape.untied else 0
        moments["embedding backward"] = (-chunk + (released if p * v > 1 else 0)
                                         + sbh * d + vocab_t * h * d + tied_wait
                                         + p2p["embedding backward"])
    n = stage_params(shape, layout, rank)
    shard = -(-n // layout.dp) if layout.distributed_optimizer else n
    step_tmp = 0
    if layout.precision != "fp32" and not layout.grad_fp32:
        step_tmp += 4 * shard  # grads cast to fp32 for the masters, all at once
    if layout.distributed_optimizer and layout.dp > 1:
        # The reduce-scatter's output shard, then the all-gather's copy of the param shard.
        step_tmp = max(step_tmp, (4 if layout.grad_fp32 else d) * shard, d * shard)
    moments["optimizer step"] = step_tmp - held  # activations are gone by then
    name = max(moments, key=moments.get)
    return RankMemory(pipeline_rank=rank, params=params, grads=grads, masters=masters,
                      optimizer_state=opt, activations=int(held),
                      transient=int(moments[name]), in_flight=flights,
                      detail=name, parts=parts,
                      moments={k: int(v) for k, v in moments.items()})


def peak_memory(shape, layout, device="cuda"):
    """The pipeline rank with the highest predicted peak, as a ``RankMemory``."""
    ranks = range(layout.pp) if layout.pp <= 3 else sorted({0, 1, layout.pp - 2, layout.pp - 1})
    return max((rank_memory(shape, layout, r, device) for r in ranks), key=lambda r: r.total)


__all__ = ["RankMemory", "rank_memory", "peak_memory", "static_bytes", "stage_params",
           "layer_activation_bytes", "mlp_activation_bytes", "in_flight", "p2p_tensors",
           "KERNELS",
           "DTYPE_BYTES"]
