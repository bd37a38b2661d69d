"""Time model: predicted seconds per training step of a layout on a hardware profile.

One step = the pipeline schedule over the micro batches (each stage's compute,
its tensor-parallel collectives and its point-to-point transfers, none of which
this code overlaps), its bubble, then the data-parallel gradient sync, the
embedding-group sum and the optimizer step (equations in docs/scaling.md):

    step = (m + (p - 1) / v) * T_mb + T_dp + T_emb + T_opt

``T_mb`` is one micro batch on the slowest pipeline rank, all its model chunks,
forward and backward: the FLOPs of bench's formula (``megatron.planning.flops``)
at ``compute_efficiency`` x the GPU's peak, the memory-bound element-wise work
every TP rank repeats on whole activations (LayerNorms, bias-dropout-add,
residual grads: divided by TP only with sequence parallelism) at the memory
bandwidth, the TP collectives (NCCL ring: 2 (n-1)/n of the bytes per all-reduce,
(n-1)/n per all-gather or reduce-scatter) on NVLink, or on the network when the
group leaves the node, and the stage-to-stage sends. The DP all-reduce takes
the faster of NCCL's ring and a hierarchical (within the node, then across
nodes) all-reduce on each GPU's share of the node's network adapters. The single calibrated number is ``compute_efficiency``
(``calibrated_efficiency``: the Megatron-LM paper's 1.2B baseline, 39 TFLOP/s).
"""
import functools
from dataclasses import dataclass

from megatron.planning.flops import (attention_core_forward_flops_per_token,
                                     gpt_flops_per_iteration, layer_forward_flops_per_token)
from megatron.planning.memory_model import stage_params


@dataclass
class StepTime:
    """Predicted seconds of one step and their parts (per step, on the slowest rank)."""
    compute: float
    elementwise: float
    tp_comm: float
    pp_comm: float
    bubble: float
    dp_comm: float
    embedding_comm: float
    optimizer: float
    total: float
    model_flops: float      # per step, all devices, without recomputation
    hardware_flops: float   # with the recomputed forward counted (as the 2019-21 papers do)
    num_devices: int
    tokens: int             # per step
    peak_flops: float       # one device

    @property
    def tokens_per_s_per_device(self):
        """Training tokens per second per device."""
        return self.tokens / self.total / self.num_devices

    @property
    def tflops_per_device(self):
        """Model TFLOP/s per device (Megatron-LM's "throughput per GPU")."""
        return self.model_flops / self.total / self.num_devices / 1e12

    @property
    def mfu(self):
        """Model FLOPs utilization: model FLOP/s per device over the device's peak."""
        return self.model_flops / self.total / self.num_devices / self.peak_flops

    def hardware_flops_per_device(self):
        """FLOP/s per device counting the recomputed forward (the papers' "achieved")."""
        return self.hardware_flops / self.total / self.num_devices


def _ring_all_reduce(nbytes, n, bandwidth):
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / bandwidth


def _ring_gather(nbytes, n, bandwidth):
    # all-gather or reduce-scatter of a tensor of ``nbytes`` whole
    return 0.0 if n <= 1 else (n - 1) / n * nbytes / bandwidth


def data_parallel_all_reduce(nbytes, members, stride, hw, gpus_per_node, fraction=1.0):
    """Seconds of an all-reduce of ``nbytes`` per rank over ``members`` ranks placed
    ``stride`` global ranks apart (``fraction`` 0.5: a reduce-scatter or all-gather), the
    faster of NCCL's two ways for large messages:

    - ring: every rank sends 2 (n-1)/n of the bytes around one ring through all ranks; the
      ring runs at its slowest hop: NVLink, or, across nodes, this group's share of the
      node's adapters (its k ranks of the node's G GPUs, all syncing at once);
    - hierarchical (tree-like): a ring within each node, then each of its k ranks
      all-reduces its 1/k share across the nodes on its own share of the adapters.
    """
    if members <= 1:
        return 0.0
    per_node = max(1, min(members, gpus_per_node // stride)) if stride < gpus_per_node else 1
    nodes = members // per_node
    if nodes == 1:
        return fraction * _ring_all_reduce(nbytes, members, hw.intra_node_bandwidth)
    share = hw.inter_node_bandwidth * per_node / gpus_per_node
    ring = _ring_all_reduce(nbytes, members, min(hw.intra_node_bandwidth, share))
    hierarchical = (_ring_all_reduce(nbytes, per_node, hw.intra_node_bandwidth)
                    + _ring_all_reduce(nbytes / per_node, nodes,
                                       hw.inter_node_bandwidth_per_gpu(gpus_per_node)))
    return fraction * min(ring, hierarchical)


# Bytes per element of a whole [s, b, h] activation that each TP rank reads and writes in
# the element-wise work TP does not divide: per layer, forward: two LayerNorms (2d each) and
# two bias-dropout-adds (3d + mask); backward: LayerNorm (3d), dropout (2d + mask),
# residual-grad sum (3d) and bias grad (d) for each half. d: dtype bytes, m: mask bytes.
def replicated_bytes_forward(d, m):
    """Bytes per element of the forward's replicated element-wise work of one layer."""
    return 10 * d + 2 * m


def replicated_bytes_backward(d, m):
    """Bytes per element of the backward's replicated element-wise work of one layer."""
    return 18 * d + 2 * m


def optimizer_bytes_per_param(precision, grad_fp32=True):
    """Bytes the optimizer step reads and writes per owned parameter: fused Adam on fp32
    masters (read param, grad, two moments; write param, moments: 28), the grad norm (4),
    clipping (8), the fp16 unscale and inf check (8), the copy into the fp16/bf16 params,
    and the cast of fp16/bf16 grads to fp32 for the masters when the buffer is not fp32."""
    n = 28 + 4 + 8
    if precision == "fp16":
        n += 8
    if precision != "fp32":
        n += 4 + 2
        if not grad_fp32:
            n += 2 + 4
    return n


def step_time(shape, layout, hw, compute_efficiency, gpus_per_node=None):
    """The predicted ``StepTime`` of ``layout`` of ``shape`` on hardware ``hw``."""
    G = gpus_per_node or hw.gpus_per_node
    t, p, v, dp, m = layout.tp, layout.pp, layout.vp, layout.dp, layout.num_microbatches
    d = layout.dtype_bytes
    s, b, h = shape.seq_length, layout.micro_batch, shape.hidden_size
    sbh = s * b * h
    vocab = shape.padded_vocab(t)
    rate = compute_efficiency * hw.peak(layout.precision)
    mask = 1 if shape.dropout else 0
    sp = layout.sequence_parallel and t > 1
    rep = 1 / t if sp else 1
    net = hw.inter_node_bandwidth_per_gpu(G)
    tp_bw = hw.intra_node_bandwidth if t <= G else net
    pp_bw = hw.intra_node_bandwidth if t * dp * p <= G else net
    layers = shape.num_layers // (p * v)
    full = layout.recompute == "full"

    # One chunk, one micro batch, forward + backward.
    fwd_flops = layers * b * s * layer_forward_flops_per_token(s, h, **shape.flops_kwargs()) / t
    chunk_flops = fwd_flops * (4 if full else 3)
    if layout.recompute == "selective":
        chunk_flops += layers * b * s * attention_core_forward_flops_per_token(s, h) / t
    elem_bytes = layers * rep * sbh * (replicated_bytes_forward(d, mask) * (2 if full else 1)
                                       + replicated_bytes_backward(d, mask))
    msg = sbh * d
    if sp:
        tp_chunk = layers * (10 + (4 if full else 0)) * _ring_gather(msg, t, tp_bw)
    else:
        tp_chunk = layers * (4 + (2 if full else 0)) * _ring_all_reduce(msg, t, tp_bw)
    p2p_chunk = 2 * rep * msg / pp_bw if p > 1 else 0.0
    logits_flops = 3 * 2 * b * s * h * vocab / t
    edge_comm = _ring_all_reduce(msg, t, tp_bw)  # embedding (first) / output layer (last)

    def rank_micro_batch(rank):
        """(compute, element-wise, TP comm, p2p) seconds of one micro batch on ``rank``."""
        flops = v * chunk_flops + (logits_flops if rank == p - 1 else 0)
        comm = v * tp_chunk + (edge_comm if rank == 0 else 0) + (edge_comm if rank == p - 1 else 0)
        return (flops / rate, v * elem_bytes / hw.memory_bandwidth, comm, v * p2p_chunk)

    parts = max((rank_micro_batch(r) for r in {0, p - 1}), key=sum)
    per_mb = sum(parts)
    steps = m + (p - 1) / v
    compute, elementwise, tp_comm, pp_comm = (x * m for x in parts)
    bubble = (steps - m) * per_mb

    # After the schedule: DP sync of each pipeline rank's grads, the tied embedding's sum
    # between the first and last stage, the optimizer step (the slowest rank counts).
    def after(rank):
        n = stage_params(shape, layout, rank)
        grad_bytes = n * (4 if layout.grad_fp32 else d)
        if layout.distributed_optimizer:
            dp_t = (data_parallel_all_reduce(grad_bytes, dp, t, hw, G, 0.5)
                    + data_parallel_all_reduce(n * d, dp, t, hw, G, 0.5))
            owned = n / dp
        else:
            dp_t = data_parallel_all_reduce(grad_bytes, dp, t, hw, G)
            owned = n
        if dp > 1:
            dp_t += 2 * grad_bytes / hw.memory_bandwidth  # the buffer is divided by DP first
        emb = 0.0
        if p > 1 and rank in (0, p - 1) and not shape.untied:  # only a tied embedding syncs
            emb = (vocab // t) * h * (4 if layout.grad_fp32 else d) / pp_bw
        opt = (owned * optimizer_bytes_per_param(layout.precision, layout.grad_fp32)
               / hw.memory_bandwidth)
        return dp_t, emb, opt

    dp_comm, embedding_comm, optimizer = max((after(r) for r in {0, p - 1}), key=sum)
    total = steps * per_mb + dp_comm + embedding_comm + optimizer
    gb = layout.global_batch
    args = (gb, s, shape.num_layers, h, vocab)
    kw = shape.flops_kwargs()
    return StepTime(compute=compute, elementwise=elementwise, tp_comm=tp_comm, pp_comm=pp_comm,
                    bubble=bubble, dp_comm=dp_comm, embedding_comm=embedding_comm,
                    optimizer=optimizer, total=total,
                    model_flops=gpt_flops_per_iteration(*args, **kw),
                    hardware_flops=gpt_flops_per_iteration(*args, recompute=layout.recompute, **kw),
                    num_devices=layout.world_size, tokens=gb * s,
                    peak_flops=hw.peak(layout.precision))


def efficiency_for(shape, layout, hw, flops_per_device, gpus_per_node=None):
    """The ``compute_efficiency`` at which ``layout`` sustains ``flops_per_device`` FLOP/s
    per device (the recomputed forward counted, as the papers count)."""
    # The step time is affine in 1 / efficiency: solve from two evaluations.
    t1 = step_time(shape, layout, hw, 1.0, gpus_per_node)
    t2 = step_time(shape, layout, hw, 0.5, gpus_per_node)
    slope = t2.total - t1.total          # seconds per unit of 1/efficiency
    fixed = t1.total - slope
    target = t1.hardware_flops / layout.world_size / flops_per_device
    if target <= fixed:
        raise ValueError(f"{flops_per_device:.3g} FLOP/s per device is out of reach: the "
                         f"non-compute parts alone take {fixed:.3g} s")
    return slope / (target - fixed)


@functools.lru_cache(maxsize=None)
def calibrated_efficiency():
    """The one calibrated number: the fraction of peak that makes the Megatron-LM paper's
    single-V100 baseline (1.2B parameters, 39 TFLOP/s sustained) come out right."""
    from megatron.planning.hardware import get_profile
    from megatron.planning.paper import BASELINE_FLOPS, paper_layout, paper_shape
    return efficiency_for(paper_shape("1.2B"), paper_layout(1, 1), get_profile("V100-32GB"),
                          BASELINE_FLOPS)
