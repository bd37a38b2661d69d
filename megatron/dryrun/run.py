"""The dry run of one rank: the real training step of a W-rank job, on fake tensors, here.

The process joins a fake world of ``world_size`` ranks as ``rank`` (``mpu`` with the
``fake`` backend: collectives and point-to-point ops return at once), builds its model
chunks, optimizer and schedule exactly as ``megatron.training`` does, under torch's
``FakeTensorMode`` (shapes and dtypes, no data, no memory: an 8.3 B model builds in
seconds), and runs one ``train_step`` and the loop's ``step_scalars`` on fake batches
of the configured shapes. One dispatch mode watches the step, ``MemoryTracker`` (live
storages, peaks), with two observers: ``mpu.CollectiveLog`` (collectives by group) and
``FlopCount`` (torch's per-op FLOP formulas). The process group and the model-parallel groups are torn down
afterwards, so one process can dry-run several ranks in turn.
"""
import contextlib
import copy
import time

import torch

from megatron import mpu
from megatron.config import ConfigError, finalize
from megatron.dryrun.flops import FlopCount
from megatron.dryrun.kernels import CudaAttention
from megatron.dryrun.memory import MemoryTracker, state_bytes, state_storages
from megatron.dryrun.microbatches import extend, plan_sample, sampled
from megatron.dryrun.report import DryRunReport
from megatron.errors import UserError

# GPT-2's BPE vocabulary: the size when its vocab/merges files are not at hand.
GPT2_BPE_VOCAB_SIZE = 50257


class DryRunError(UserError, RuntimeError):
    """The dry run cannot start (e.g. this process already has a process group)."""


def vocab_size_of(cfg):
    """The tokenizer's vocabulary size; GPT-2 BPE's known size when its files are missing."""
    from megatron.tokenizer import build_tokenizer
    try:
        return build_tokenizer(cfg.tokenizer).vocab_size
    except (ValueError, OSError) as e:
        if (cfg.tokenizer.type or "GPT2BPETokenizer") == "GPT2BPETokenizer":
            return GPT2_BPE_VOCAB_SIZE
        raise ConfigError(f"{e}; the dry run needs only the vocabulary size: pass "
                          f"--vocab-size N (vocab_size= from Python)") from None


def gpt_model_provider(cfg, vocab_size):
    """``model_provider(pre_process, post_process)`` building this rank's GPTModel chunk."""
    from megatron.model import GPTModel
    from megatron.tokenizer import padded_vocab_size
    padded = padded_vocab_size(vocab_size, cfg.model.make_vocab_size_divisible_by,
                               cfg.parallel.tensor_model_parallel_size)

    def provider(pre_process=True, post_process=True):
        return GPTModel(cfg, padded, pre_process=pre_process, post_process=post_process,
                        vocab_size=vocab_size)
    return provider


def gpt_forward_step(data_iterator, model):
    """The GPT forward step of pretrain_gpt.py: loss-mask weighted mean of the token losses."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], labels=batch["labels"])
    loss_mask = batch["loss_mask"].float()

    def loss_func(output_tensor):
        loss = (output_tensor.float().view(-1) * loss_mask.view(-1)).sum() / loss_mask.sum().clamp(min=1)
        return loss, {"lm loss": loss.detach()}
    return output, loss_func


def fake_batches(micro_batch_size, seq_length):
    """Endless micro batches as the GPT data loader gives them, ``[b, s]`` each (made
    inside the fake mode, so they hold no data)."""
    b, s = micro_batch_size, seq_length
    while True:
        yield {"tokens": torch.zeros(b, s, dtype=torch.long),
               "labels": torch.zeros(b, s, dtype=torch.long),
               "loss_mask": torch.ones(b, s, dtype=torch.float32),
               "position_ids": torch.arange(s).unsqueeze(0).expand(b, s)}


def formula_flops(cfg, world_size, padded_vocab):
    """The paper's FLOPs of one iteration of the whole job (bench/flops.py, term by term),
    divided by ``world_size``: one rank's share."""
    m, t = cfg.model, cfg.training
    h, s, l_, ffn = m.hidden_size, m.seq_length, m.num_layers, m.ffn_hidden_size or 4 * m.hidden_size
    layer_fwd_per_token = 2 * (3 * h * h + h * h + 2 * h * ffn) + 2 * 2 * s * h
    layer_passes = 4 if t.recompute == "full" else 3
    total = t.global_batch_size * s * (layer_passes * l_ * layer_fwd_per_token
                                       + 3 * 2 * h * padded_vocab)
    return total / world_size


def rank_coordinates(rank, world_size, tp, pp):
    """``(tp_rank, pp_rank, dp_rank)`` of a global rank under mpu's layout."""
    per_stage = world_size // pp
    return rank % tp, rank // per_stage, (rank % per_stage) // tp


def global_rank(tp_rank, pp_rank, dp_rank, world_size, tp, pp):
    """The global rank at these coordinates (the inverse of ``rank_coordinates``)."""
    return pp_rank * (world_size // pp) + dp_rank * tp + tp_rank


def role_name(pp_rank, pp, dp_rank, dp):
    """``first stage`` / ``middle stage`` / ``last stage`` / ``only stage``, and ``DP rank 0``
    or ``DP rank > 0``."""
    if pp == 1:
        stage = "only stage"
    elif pp_rank == 0:
        stage = "first stage"
    elif pp_rank == pp - 1:
        stage = "last stage"
    else:
        stage = "middle stage"
    return f"{stage}, DP rank {'0' if dp_rank == 0 else '> 0'}"


def distinct_roles(cfg, world_size):
    """One representative global rank per distinct role (first / middle / last pipeline
    stage x DP rank 0 or not), TP rank 0: ``[(rank, role name), ...]``.

    The middle role's representative is stage 1, the middle stage that holds the most
    micro batches in flight (stage r of a 1F1B pipeline holds p - r; the interleaved
    schedule's warm-up shrinks with r too), so its peak bounds every middle stage's.
    TP ranks differ only in which vocabulary rows are padding."""
    p = cfg.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    dp = world_size // (tp * pp)
    stages = sorted({0, min(1, pp - 1), pp - 1})
    dps = sorted({0, dp - 1})
    return [(global_rank(0, s, d, world_size, tp, pp), role_name(s, pp, d, dp))
            for s in stages for d in dps]


def _warm_caches():
    """Run the probes the step caches (on real tensors), so none runs on fake ones."""
    from megatron.optimizer import _fused_adamw_supported
    from megatron.schedules import _can_release_outputs
    _can_release_outputs()
    _fused_adamw_supported("cpu")


def _with_phase(tracker, forward_backward, trace):
    """``forward_backward`` measured as the tracker's ``schedule`` phase, traced."""
    def run(*args, **kwargs):
        with tracker.phase("schedule"):
            return forward_backward(*args, trace=trace, **kwargs)
    return run


def default_target(cfg):
    """``cpu`` for a run configured for the CPU (``training.device=cpu``), else ``cuda``."""
    return "cpu" if cfg.training.device == "cpu" else "cuda"


class _Job:
    """The finalized config of one job and what a step of it needs: providers, sizes."""

    def __init__(self, cfg, world_size, model_provider, forward_step_func, vocab_size):
        from megatron.tokenizer import padded_vocab_size
        self.cfg = finalize(copy.deepcopy(cfg), world_size)
        self.cfg.training.compile = False  # compiled or not, the tensors are the same
        self.world_size = world_size
        self.vocab_size = vocab_size_of(self.cfg) if vocab_size is None else vocab_size
        self.padded_vocab = padded_vocab_size(self.vocab_size,
                                              self.cfg.model.make_vocab_size_divisible_by,
                                              self.cfg.parallel.tensor_model_parallel_size)
        self.model_provider = model_provider or gpt_model_provider(self.cfg, self.vocab_size)
        self.forward_step_func = forward_step_func or gpt_forward_step
        p = self.cfg.parallel
        self.tp, self.pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        self.vp = p.virtual_pipeline_model_parallel_size or 1
        self.dp = world_size // (self.tp * self.pp)

    def initialize_model_parallel(self):
        """mpu's groups for this layout (a layout error is a ConfigError)."""
        try:
            mpu.initialize_model_parallel(self.tp, self.pp,
                                          self.cfg.parallel.virtual_pipeline_model_parallel_size)
        except mpu.ModelParallelConfigError as e:
            raise ConfigError(str(e)) from None
        mpu.model_parallel_seed(self.cfg.training.seed)

    def build(self, device):
        """Model chunks, optimizer, LR scheduler and step schedule, as training builds them."""
        from megatron.optimizer import get_megatron_optimizer
        from megatron.train_step import StepSchedule
        from megatron.training import build_model, build_scheduler
        chunks = build_model(self.cfg, self.model_provider, device)
        optimizer = get_megatron_optimizer(self.cfg, chunks)
        return chunks, optimizer, build_scheduler(self.cfg, optimizer), \
            StepSchedule.from_config(self.cfg)

    def step(self, parts, data, tracker, observers=(), sample=None, counters=None):
        """One training step (and the loop's per-step scalars) under ``tracker``: the
        figures of that step. ``data`` is one micro-batch iterator per model chunk.
        With a ``Sample`` (``microbatches.py``) the schedule runs ``sample.simulated``
        micro batches, and ``figures["periods"]`` holds ``counters()`` at the start and
        the end of the measured period."""
        from megatron.schedules import ScheduleTrace
        from megatron.train_step import step_scalars, train_step
        chunks, optimizer, scheduler, schedule = parts
        trace = ScheduleTrace()
        run_schedule = schedule.forward_backward
        periods = {}
        inner = run_schedule if sample is None else sampled(run_schedule, sample, counters,
                                                              periods)
        schedule.forward_backward = _with_phase(tracker, inner, trace)
        device = next(chunks[0].parameters()).device
        mark = tracker.mark()
        reads = tracker.host_reads
        tracker.observers += list(observers)
        try:
            step = train_step(schedule, self.forward_step_func,
                              data[0] if len(data) == 1 else data, chunks, optimizer, scheduler)
            step_scalars(step.loss_dicts, mpu.is_pipeline_last_stage(ignore_virtual=True),
                         [False, False], device)
        finally:
            tracker.observers = tracker.observers[:len(tracker.observers) - len(observers)]
            schedule.forward_backward = run_schedule
        del step
        return dict(mark=mark, first_step_peak=tracker.peak,
                    activation_peak=tracker.phase_peaks["schedule"]
                    - tracker.phase_starts["schedule"],
                    in_flight=trace.max_in_flight, host_reads=tracker.host_reads - reads,
                    periods=periods,
                    simulated=schedule.num_microbatches if sample is None else sample.simulated)

    def report(self, rank, parts, figures, peak, collectives=None, flops=None, target="cpu"):
        """The DryRunReport of this rank from a step's figures (``collectives``: a
        ``CollectiveLog.summary()``; ``flops``: a number)."""
        chunks, optimizer, _, schedule = parts
        p, t = self.cfg.parallel, self.cfg.training
        state = state_bytes(chunks, optimizer)
        return DryRunReport(
            rank=rank, world_size=self.world_size,
            role=role_name(mpu.get_pipeline_model_parallel_rank(), self.pp,
                           mpu.get_data_parallel_rank(), self.dp),
            tensor_model_parallel_rank=mpu.get_tensor_model_parallel_rank(),
            pipeline_model_parallel_rank=mpu.get_pipeline_model_parallel_rank(),
            data_parallel_rank=mpu.get_data_parallel_rank(),
            layout=dict(tp=self.tp, pp=self.pp, vp=self.vp, dp=self.dp, precision=t.precision,
                        recompute=t.recompute, sequence_parallel=bool(p.sequence_parallel),
                        distributed_optimizer=bool(p.distributed_optimizer),
                        micro_batch_size=t.micro_batch_size,
                        num_microbatches=schedule.num_microbatches,
                        global_batch_size=t.global_batch_size,
                        padded_vocab_size=self.padded_vocab, target=target),
            num_parameters=sum(q.numel() for c in chunks for q in c.parameters()),
            parameter_bytes=state["parameters"], gradient_bytes=state["gradients"],
            master_weight_bytes=state["master_weights"],
            optimizer_state_bytes=state["optimizer_state"],
            activation_peak_bytes=figures["activation_peak"],
            in_flight_microbatches=figures["in_flight"],
            first_step_peak_bytes=figures["first_step_peak"], peak_bytes=peak,
            collectives=[] if collectives is None else _collective_rows(
                collectives, bool(p.sequence_parallel)),
            flops=0 if flops is None else int(flops),
            formula_flops=formula_flops(self.cfg, self.world_size, self.padded_vocab),
            host_reads=figures["host_reads"], simulated_microbatches=figures["simulated"])


def dry_run(cfg, world_size, rank=0, *, model_provider=None, forward_step_func=None,
            vocab_size=None, target=None, all_microbatches=False):
    """Dry-run global rank ``rank`` of a ``world_size``-rank job of ``cfg``; a DryRunReport.

    ``model_provider(pre_process, post_process)`` and ``forward_step_func(data_iterator,
    model)`` are the training script's (default: GPTModel and GPT's loss-masked forward
    step); the data iterator yields fake GPT micro batches. ``vocab_size`` defaults to the
    tokenizer's. ``target`` is the device whose kernel choices count: ``cuda`` (attention
    as CUDA's fused kernels keep it, see ``kernels.py``) or ``cpu`` (what this CPU runs);
    default ``default_target(cfg)``. Layout errors raise ``ConfigError`` as they would at
    launch. The process must not have a process group of its own (the dry run makes and
    destroys a fake one).

    Of many micro batches it simulates only as many as determine the peak (exact) and
    extrapolates the counts that grow with them (FLOPs, per-micro-batch collectives, host
    reads; ``microbatches.py``): ``simulated_microbatches`` of the report says how many
    ran. ``all_microbatches`` runs every one.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    start_time = time.perf_counter()
    job = _Job(cfg, world_size, model_provider, forward_step_func, vocab_size)
    if not 0 <= rank < world_size:
        raise ConfigError(f"dry run rank {rank} is not in a world of {world_size} ranks")
    if mpu.is_distributed():
        raise DryRunError("the dry run needs a process without a process group "
                          "(it plays its rank in a fake world of its own)")
    target = target or default_target(job.cfg)
    if target not in ("cpu", "cuda"):
        raise ConfigError(f"dry run target {target!r} is not one of cpu, cuda")
    _warm_caches()
    mpu.init_process_group("fake", rank, world_size, 30)
    try:
        job.initialize_model_parallel()
        log, flops = mpu.CollectiveLog(), FlopCount()
        tracker = MemoryTracker(fake=True)
        kernels = CudaAttention() if target == "cuda" else contextlib.nullcontext()
        with FakeTensorMode(allow_non_fake_inputs=True), tracker:
            parts = job.build(torch.device("cpu"))
            data = [fake_batches(job.cfg.training.micro_batch_size, job.cfg.model.seq_length)
                    for _ in parts[0]]
            sample = None if all_microbatches else plan_sample(
                job.pp, job.vp, mpu.get_pipeline_model_parallel_rank(), parts[3].num_microbatches)

            def counters():
                return {"collectives": log.summary(), "flops": flops.total,
                        "host_reads": tracker.host_reads}
            with kernels:
                figures = job.step(parts, data, tracker, [log.observe, flops.observe],
                                   sample, counters)
            counts = {"collectives": log.summary(), "flops": flops.total,
                      "host_reads": figures["host_reads"]}
            if sample is not None:
                counts = extend(counts, figures["periods"]["start"], figures["periods"]["end"],
                                sample.skipped_periods)
                figures["host_reads"] = counts["host_reads"]
            report = job.report(rank, parts, figures, tracker.steady_peak(figures["mark"]),
                                counts["collectives"], counts["flops"], target)
            tracker.stop()
            del parts, data
    finally:
        if mpu.model_parallel_is_initialized():
            mpu.destroy_model_parallel()
        mpu.destroy_process_group()
    report.seconds = time.perf_counter() - start_time
    return report


def random_batches(micro_batch_size, seq_length, vocab_size, seed=0):
    """Endless real micro batches of random tokens, shaped as ``fake_batches``."""
    g = torch.Generator().manual_seed(seed)
    b, s = micro_batch_size, seq_length
    while True:
        tokens = torch.randint(0, vocab_size, (b, s + 1), generator=g)
        yield {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
               "loss_mask": torch.ones(b, s, dtype=torch.float32),
               "position_ids": torch.arange(s).unsqueeze(0).expand(b, s)}


def measure(cfg, *, steps=2, model_provider=None, forward_step_func=None, vocab_size=None,
            device=None):
    """The dry run's figures measured for real: this rank of the current process group
    (gloo or nccl, mpu not yet initialized for it) builds the job of ``cfg`` and runs
    ``steps`` training steps on random tokens under a ``MemoryTracker`` that starts from
    the run's state (parameters, gradient buffers, masters, optimizer state).

    Returns the report of step 1 (``first_step_peak_bytes``, activations, collectives)
    with ``peak_bytes`` the peak of the last step. On a CPU, tensor bytes as the
    tracker counts them; the layout is left initialized (``destroy_model_parallel``).
    """
    job = _Job(cfg, mpu.get_global_world_size(), model_provider, forward_step_func, vocab_size)
    device = device or torch.device("cpu")
    job.initialize_model_parallel()
    parts = job.build(device)
    data = [random_batches(job.cfg.training.micro_batch_size, job.cfg.model.seq_length,
                           job.vocab_size, seed=mpu.get_data_parallel_rank())
            for _ in parts[0]]
    # One tracker over all steps: a later step starts with what the earlier ones left
    # alive (optimizer state, the model's last input tensor), as in the training loop.
    tracker = MemoryTracker()
    tracker.add_all(t for ts in state_storages(parts[0], parts[1]).values() for t in ts)
    first, log, peak = None, None, 0
    with tracker:
        for _ in range(steps):
            step_log = mpu.CollectiveLog()
            figures = job.step(parts, data, tracker, [step_log.observe])
            if first is None:
                first, log = figures, step_log
            peak = figures["first_step_peak"]
    tracker.stop()
    return job.report(mpu.get_global_rank(), parts, first, peak, log.summary(), None,
                      "cuda" if device.type == "cuda" else "cpu")


def _collective_rows(summary, sequence_parallel):
    """Rows ``{"group", "kind", "calls", "bytes"}``; with sequence parallelism the TP
    group's all-gathers and reduce-scatters are listed as group ``sp``."""
    rows = {}
    for (group, kind), v in summary.items():
        if sequence_parallel and group == "tp" and kind in ("all_gather", "reduce_scatter"):
            group = "sp"
        row = rows.setdefault((group, kind), {"group": group, "kind": kind, "calls": 0, "bytes": 0})
        row["calls"] += v["calls"]
        row["bytes"] += v["bytes"]
    order = ["tp", "sp", "pp", "dp", "mp", "embedding", "world", "other"]
    return sorted(rows.values(), key=lambda r: (order.index(r["group"]), r["kind"]))


def dry_run_roles(cfg, world_size, **kwargs):
    """``dry_run`` of one rank per distinct role (``distinct_roles``), one after the other
    in this process (each in its own fake world, torn down after it)."""
    return [dry_run(cfg, world_size, rank, **kwargs) for rank, _ in distinct_roles(
        finalize(copy.deepcopy(cfg), world_size), world_size)]
