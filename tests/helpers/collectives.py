"""The collectives the model's code must issue: per transformer layer, and per training step.

``layer_collectives`` is the paper's count for one layer at TP > 1 (what
tests/test_model_collectives.py checks on a layer); ``step_collectives`` builds, from
it, the calls one rank makes in one training step (``megatron.train_step.train_step``
and the loop's ``step_scalars``), by group, as ``mpu.CollectiveLog`` names them, with
``sp`` for the TP group's all-gathers and reduce-scatters under sequence parallelism.
"""
import collections


def layer_collectives(sequence_parallel, recompute):
    """``(forward, backward)`` collective counts of one transformer layer at TP > 1.

    Without sequence parallelism 2 all-reduces forward and 2 backward; with it, forward
    2 all-gathers (the column layers' inputs) + 2 reduce-scatters (the row layers'
    outputs), backward 4 all-gathers (each column layer re-gathers its input for the
    weight gradient, each row layer gathers its output gradient) + 2 reduce-scatters.
    Full recomputation replays the forward's collectives in backward.
    """
    if sequence_parallel:
        forward = {"all_gather": 2, "reduce_scatter": 2}
        backward = {"all_gather": 4, "reduce_scatter": 2}
    else:
        forward = {"all_reduce": 2}
        backward = {"all_reduce": 2}
    if recompute == "full":
        backward = {k: backward[k] + forward.get(k, 0) for k in backward}
    return forward, backward


def step_collectives(*, tp, pp, vp, dp, layers_on_rank, first_stage, last_stage,
                     num_microbatches, sequence_parallel, recompute, precision,
                     distributed_optimizer, clip_grad=1.0, grad_buffers_per_chunk=1):
    """``{(group, kind): calls}`` of one rank's training step.

    Per micro batch on the TP group: the word embedding's all-reduce (first stage; its
    sequence split gathers in backward), the output layer's input copy (all-reduce in
    backward; with sequence parallelism an all-gather forward and a reduce-scatter
    backward), the vocab-parallel cross entropy's 2 all-reduces (last stage), and each
    layer's ``layer_collectives``. Pipelines send each micro batch's activations on and
    its gradients back once per model chunk (none into the first stage's first chunk or
    out of the last stage's last). Once per step: the TP sum of sequence-parallel
    grads, the embedding group's sum of the tied embedding's grads (PP > 1), the DP
    all-reduce (distributed optimizer: reduce-scatter, then all-gather of the
    parameters) of each grad buffer, the optimizer's overflow / non-finite check (a max
    over the model-parallel and DP groups) and grad-norm sum (model-parallel; DP too
    when sharded), and the loop's one all-reduce of the step's scalars over the world.
    """
    c = collections.Counter()
    m = num_microbatches
    tp_group = "tp"
    sp_group = "sp" if sequence_parallel else "tp"
    if tp > 1:
        fwd, bwd = layer_collectives(sequence_parallel, recompute)
        for kind, n in list(fwd.items()) + list(bwd.items()):
            c[(tp_group if kind == "all_reduce" else sp_group, kind)] += n * layers_on_rank * m
        if first_stage:
            c[(tp_group, "all_reduce")] += m
            if sequence_parallel:
                c[(sp_group, "all_gather")] += m
        if last_stage:
            c[(tp_group, "all_reduce")] += 2 * m
            if sequence_parallel:
                c[(sp_group, "all_gather")] += m
                c[(sp_group, "reduce_scatter")] += m
            else:
                c[(tp_group, "all_reduce")] += m
        if sequence_parallel:
            c[(tp_group, "all_reduce")] += 1
    if pp > 1:
        sends = recvs = 2 * m * vp
        if first_stage:
            recvs -= m  # no activations into chunk 0 of the first stage
            sends -= m  # no gradient out of it
        if last_stage:
            sends -= m
            recvs -= m
        c[("pp", "send")] += sends
        c[("pp", "recv")] += recvs
        if first_stage or last_stage:
            c[("embedding", "all_reduce")] += 1
    buffers = vp * grad_buffers_per_chunk
    if dp > 1:
        if distributed_optimizer:
            c[("dp", "reduce_scatter")] += buffers
            c[("dp", "all_gather")] += buffers
        else:
            c[("dp", "all_reduce")] += buffers
    checks_overflow = precision == "fp16" or clip_grad > 0
    if tp * pp > 1:
        c[("mp", "all_reduce")] += checks_overflow + (clip_grad > 0)
    if dp > 1:
        c[("dp", "all_reduce")] += checks_overflow + (clip_grad > 0 and distributed_optimizer)
    if tp * pp * dp > 1:
        c[("world", "all_reduce")] += 1
    return {k: v for k, v in c.items() if v}
