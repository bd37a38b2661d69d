"""The training loop: batches -> schedule -> optimizer step -> log / evaluate / save.

`pretrain(cfg, model_provider, datasets_provider, forward_step_func)` is the one
entry point (see docs/architecture.md for the contracts of the three callables).
It builds a `Run` (model chunks, optimizer, schedule, writer, data) and hands it
to `train`, which is made of named pieces: `train_step` (megatron/train_step.py),
the log window (`LogWindow`, megatron/training_log.py), `evaluate_and_log`,
`save` and `exit_reason`. After the loop: the final validation, save, test
evaluation and text sample (`finish`).
"""
import contextlib
import math
import signal
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron import checkpoint
from megatron.config import finalize
from megatron.errors import UserError
from megatron.initialize import (CollectiveTimeoutError, PeerLostError, initialize_megatron,
                                 world_size_from_env)
from megatron.logging import is_last_rank, print_rank_0
from megatron.metrics_writer import MetricsWriter, build_metrics_writer
from megatron.mpu.collectives import fail_together
from megatron.train_step import StepSchedule, mean_loss, step_scalars, train_step
from megatron.training_log import LogWindow, log_evaluation
from megatron.utils import DTYPES, average_over_data_parallel, unwrap_model


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses); one-line message."""


class _ExitSignal:
    """Remembers a SIGTERM so the loop can save and leave at an iteration boundary."""

    def __init__(self):
        self.received = False
        self._previous = None

    def install(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None

    def _handler(self, signum, frame):
        self.received = True

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def build_model(cfg, model_provider, device):
    """One DDP-wrapped model chunk per virtual pipeline stage, in the precision's dtype."""
    from megatron import mpu
    from megatron.mpu.distributed import DistributedDataParallel
    vp = cfg.parallel.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for i in range(vp):
        if vp > 1:
            mpu.set_virtual_pipeline_model_parallel_rank(i)
        model = model_provider(pre_process=mpu.is_pipeline_first_stage(),
                               post_process=mpu.is_pipeline_last_stage())
        # training.compile is applied inside GPTModel (each transformer layer is
        # compiled there); compiling the whole chunk again would trace it twice.
        cast_module_(model, device, DTYPES[cfg.training.precision])
        chunks.append(DistributedDataParallel(
            model, accumulate_allreduce_grads_in_fp32=cfg.parallel.accumulate_allreduce_grads_in_fp32,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer))
    if vp > 1:
        mpu.set_virtual_pipeline_model_parallel_rank(0)
    return chunks


def cast_module_(module, device, dtype):
    """Move ``module`` to ``device`` and its floating-point tensors to ``dtype`` in place.

    Like ``Module.to``, but every parameter stays the same object, so the mpu attributes
    set on it (tensor_model_parallel, tied_embedding, ...) stay too: ``Module.to`` swaps
    whole tensors, attributes included, for fake tensors (the dry run) and under
    ``torch.__future__.set_swap_module_params_on_conversion(True)``.
    """
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            t.data = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)


def build_scheduler(cfg, optimizer):
    """Warmup then cosine/linear/constant decay from optimizer.lr to optimizer.min_lr."""
    from megatron.optimizer.lr_scheduler import OptimizerParamScheduler
    return OptimizerParamScheduler(optimizer, cfg.optimizer, cfg.training.train_iters)


def _num_samples(cfg):
    """Samples each split must provide: training, every evaluation's batches, the test pass."""
    t = cfg.training
    gbs = t.global_batch_size
    eval_batches = t.eval_iters * gbs
    return [t.train_iters * gbs, eval_batches, eval_batches]


def build_data_iterators(cfg, datasets, consumed_samples, device=None):
    """Loader factories for train/valid/test; train starts at `consumed_samples` (exact resume).

    Batches are pinned when `device` is a CUDA device.
    """
    from megatron import mpu
    from megatron.data.samplers import build_pretraining_data_loader
    dp_rank, dp_size = mpu.get_data_parallel_rank(), mpu.get_data_parallel_world_size()
    pin = device is not None and torch.device(device).type == "cuda"
    loaders = []
    for i, ds in enumerate(datasets):
        if ds is None:
            loaders.append(None)
            continue
        start = consumed_samples if i == 0 else 0
        loaders.append(lambda ds=ds, start=start: build_pretraining_data_loader(
            ds, start, cfg.training.micro_batch_size, dp_rank, dp_size,
            num_workers=cfg.data.num_workers, pin_memory=pin))
    return loaders


def _iterators(loader_factory, num_chunks):
    if loader_factory is None:
        return None
    if num_chunks == 1:
        return iter(loader_factory())
    return [iter(loader_factory()) for _ in range(num_chunks)]


@dataclass
class Run:
    """What every piece of the loop shares, built once by `pretrain`: the config, the
    model chunks and their optimizer and LR schedule, this rank's schedule of a global
    batch, the device, the metrics writer (TensorBoard, W&B) and the train/valid/test
    loader factories (None for an empty split)."""
    cfg: object
    forward_step_func: Callable
    model_chunks: list
    optimizer: object
    scheduler: object
    schedule: StepSchedule
    device: torch.device
    writer: MetricsWriter
    train_data: Optional[Callable] = None
    valid_data: Optional[Callable] = None
    test_data: Optional[Callable] = None
    memory_report: Optional[object] = None  # megatron.dryrun.runtime.MemoryReport


def evaluate(run, data_factory):
    """Mean lm loss over `eval_iters` global batches of a split (from its start each time,
    so validation losses are comparable over time), averaged over data parallelism."""
    for c in run.model_chunks:
        c.eval()
    data_iter = _iterators(data_factory, len(run.model_chunks))
    total = []
    with torch.no_grad():
        for _ in range(run.cfg.training.eval_iters):
            dicts = run.schedule.run(run.forward_step_func, data_iter, run.model_chunks,
                                     forward_only=True)
            total.append(mean_loss(dicts, run.device).item())
    for c in run.model_chunks:
        c.train()
    return average_over_data_parallel([sum(total) / max(len(total), 1)], run.device)[0]


def evaluate_and_log(run, name, data_factory, iteration, consumed_samples):
    """Evaluate a split and log it as `lm loss <name>`; returns the loss."""
    loss = evaluate(run, data_factory)
    log_evaluation(run.writer, name, iteration, consumed_samples, loss)
    return loss


def save(run, iteration, consumed_samples):
    """Save a checkpoint of the run at `iteration` (collective)."""
    checkpoint.save_checkpoint(run.cfg, iteration, consumed_samples, run.model_chunks,
                                  run.optimizer, run.scheduler)


def exit_reason(cfg, iteration, sigterm, duration):
    """Why the loop stops after `iteration` before train_iters, or None to go on."""
    t = cfg.training
    if sigterm:
        return "SIGTERM received"
    if duration:
        return f"training.exit_duration_in_mins={t.exit_duration_in_mins} reached"
    if t.exit_interval and iteration % t.exit_interval == 0 and iteration < t.train_iters:
        return f"training.exit_interval={t.exit_interval} reached"
    return None


def _check_nonfinite(cfg, run_length, iteration):
    # Every rank counts the same run of non-finite losses (the loss is all-reduced),
    # so all stop together.
    if run_length >= cfg.training.max_nonfinite_losses:
        raise TrainingError(f"lm loss was not finite for {run_length} consecutive "
                            f"iterations (training.max_nonfinite_losses="
                            f"{cfg.training.max_nonfinite_losses}) at iteration {iteration}: "
                            f"lower optimizer.lr={cfg.optimizer.lr} or check the data")


def train(run, iteration, consumed_samples, exit_signal, rng_state=None):
    """Run optimizer steps from `iteration` until train_iters or an exit condition.

    Returns the history: `train_losses` (last pipeline stage) and `grad_norms` per
    iteration, `valid_losses`, `exit_reason`, the final `iteration`,
    `consumed_samples` and `skipped_iterations`.
    """
    from megatron import mpu
    cfg, t = run.cfg, run.cfg.training
    gbs = t.global_batch_size
    # A resumed run that has already reached train_iters reads no batch; its
    # sampler would also refuse a start at the end of an exactly sized dataset.
    train_iter = (_iterators(run.train_data, len(run.model_chunks))
                  if iteration < t.train_iters else None)
    if rng_state is not None:
        checkpoint.set_rng_state(rng_state)
    history = {"train_losses": {}, "grad_norms": {}, "valid_losses": {}, "exit_reason": None}
    for c in run.model_chunks:
        c.train()
    start_time = time.time()
    last_stage = mpu.is_pipeline_last_stage(ignore_virtual=True)
    evaluating = run.valid_data is not None and t.eval_iters > 0
    if iteration == 0 and evaluating:
        # The starting point of the validation curve (about ln(vocab) for a fresh model).
        history["valid_losses"][0] = evaluate_and_log(run, "validation", run.valid_data, 0,
                                                      consumed_samples)
    window = LogWindow(iteration)
    total_skipped = nonfinite_run = 0
    print_rank_0(f"training: iterations {iteration} -> {t.train_iters}, global batch {gbs}, "
                 f"micro batch {t.micro_batch_size}, {run.schedule.num_microbatches} micro "
                 f"batches per step, data-parallel size {mpu.get_data_parallel_world_size()}")
    memory = run.memory_report  # measured over this process's first iteration only
    while iteration < t.train_iters:
        with memory.measure(run) if memory else contextlib.nullcontext():
            step = train_step(run.schedule, run.forward_step_func, train_iter, run.model_chunks,
                              run.optimizer, run.scheduler)
        iteration += 1
        consumed_samples += gbs
        total_skipped += not step.update_successful

        # The loss is only known on the last pipeline stage; the one per-step
        # all-reduce shares its DP mean (and the stop flags) with every rank.
        duration = (t.exit_duration_in_mins is not None
                    and (time.time() - start_time) / 60.0 > t.exit_duration_in_mins)
        loss, (sigterm, duration) = step_scalars(step.loss_dicts, last_stage,
                                                 [exit_signal.received, duration], run.device)
        # Every rank has the global norm (None when clipping is off); read after the
        # scalars' transfer has waited for the step anyway.
        history["grad_norms"][iteration] = None if step.grad_norm is None else float(step.grad_norm)
        if memory:
            memory.log(run, iteration)
            memory = None
        if last_stage:
            history["train_losses"][iteration] = loss
        nonfinite_run = 0 if math.isfinite(loss) else nonfinite_run + 1
        window.add(loss, not step.update_successful, last_stage)
        if nonfinite_run:
            _check_nonfinite(cfg, nonfinite_run, iteration)

        if iteration % cfg.logging.log_interval == 0:
            window.emit(run, iteration, consumed_samples, step.grad_norm, run.scheduler.get_lr())
        if evaluating and iteration % t.eval_interval == 0 and iteration < t.train_iters:
            history["valid_losses"][iteration] = evaluate_and_log(
                run, "validation", run.valid_data, iteration, consumed_samples)

        ck = cfg.checkpoint
        saved = bool(ck.save and ck.save_interval and iteration % ck.save_interval == 0)
        if saved:
            save(run, iteration, consumed_samples)
        reason = exit_reason(cfg, iteration, sigterm, duration)
        if reason:
            if ck.save and not saved:
                save(run, iteration, consumed_samples)
            print_rank_0(f"exiting at iteration {iteration}: {reason}")
            history["exit_reason"] = reason
            break
    run.writer.flush()
    history.update(iteration=iteration, consumed_samples=consumed_samples,
                   skipped_iterations=total_skipped)
    return history


def _build_datasets(cfg, datasets_provider):
    """Preprocess on first use, then build datasets on rank 0 before the others.

    Rank 0 goes first so that the files and index caches it writes are simply
    read by every other rank.
    """
    from megatron import mpu
    rank = mpu.get_global_rank()
    datasets = None
    # A failure on one rank (a bad data path, a full disk) raises on every rank.
    with fail_together("building the datasets"):
        if rank == 0:
            if cfg.data.preprocess_input:
                from megatron.data.preprocess import ensure_preprocessed
                ensure_preprocessed(cfg.data, cfg.tokenizer)
            datasets = datasets_provider(cfg, _num_samples(cfg))
    with fail_together("building the datasets"):
        if rank != 0:
            datasets = datasets_provider(cfg, _num_samples(cfg))
    return datasets


def _on_rank_0(predicate, device):
    """`predicate()` evaluated on global rank 0 and shared with every rank.

    For decisions that lead to collectives (a final save) but read the
    filesystem, where another node may still see a stale file.
    """
    from megatron import mpu
    if mpu.get_global_world_size() == 1:
        return bool(predicate())
    flag = torch.tensor([float(bool(predicate())) if mpu.get_global_rank() == 0 else 0.0],
                        device=device)
    return bool(mpu.broadcast(flag, src=0).item())


def sample_text(run, tokenizer):
    """The configured text sample from the trained model (`training.sample_prompt`,
    `sample_tokens`, `sample_top_k`: greedy when 1), through megatron.inference.

    Sequence parallelism is a training layout: the sample runs the same weights
    without it, so a prompt of any length works.
    """
    from megatron.inference import InferenceModel, generate_tokens
    from megatron.model import without_sequence_parallel
    t = run.cfg.training
    model = unwrap_model(run.model_chunks[0])
    im = InferenceModel(model, run.cfg, tokenizer, run.device, iteration=None)
    prompt = tokenizer.tokenize(t.sample_prompt)[-(im.max_sequence_length - 1):]
    num_tokens = min(t.sample_tokens, im.max_sequence_length - max(len(prompt), 1))
    model.eval()
    try:
        with without_sequence_parallel(model):
            tokens, _ = generate_tokens(im, prompt, num_tokens, greedy=t.sample_top_k <= 1,
                                        top_k=max(t.sample_top_k, 0), seed=t.seed)
    finally:
        model.train()
    return tokenizer.detokenize(tokens if prompt else tokens[1:])


def finish(run, history, tokenizer=None):
    """After a run that reached train_iters: the final validation, the final save (unless
    the last iteration was just saved), the test split once, then the text sample."""
    from megatron import mpu
    it, consumed = history["iteration"], history["consumed_samples"]
    cfg, t = run.cfg, run.cfg.training
    if run.valid_data is not None and it > 0 and t.eval_iters > 0:
        history["valid_losses"][it] = evaluate_and_log(run, "validation", run.valid_data, it,
                                                       consumed)
    ck = cfg.checkpoint
    if ck.save and it > 0 and _on_rank_0(
            lambda: checkpoint.read_latest_iteration(ck.save) != it, run.device):
        save(run, it, consumed)
    if run.test_data is not None and it > 0 and t.eval_iters > 0:
        # Once, on the held-out test split, after the final save.
        history["test_loss"] = evaluate_and_log(run, "test", run.test_data, it, consumed)
    if (tokenizer is not None and t.sample_prompt
            and mpu.get_pipeline_model_parallel_world_size() == 1):
        text = sample_text(run, tokenizer)
        print_rank_0(f"sample from the final model:\n{text}")
        history["sample"] = text


def pretrain(cfg, model_provider, datasets_provider, forward_step_func, tokenizer=None):
    """Train a model end to end: initialize, build, (resume), train, evaluate, save, sample.

    `datasets_provider(cfg, train_valid_test_num_samples) -> (train, valid, test)`.
    `tokenizer` (optional) is used for the text sample after training.
    Returns a dict with `iteration`, `consumed_samples`, `train_losses` and
    `valid_losses` (iteration -> loss, on the last pipeline stage), `grad_norms`
    (iteration -> global grad norm before clipping, every rank; None when
    clipping is off), `exit_reason`, and `test_loss` when the run finished and has a
    test split (evaluated once, after the final save).
    """
    from megatron import mpu
    from megatron.optimizer import get_megatron_optimizer

    finalize(cfg, world_size_from_env())  # layout errors before any process group exists
    memory = None
    if cfg.logging.memory_report:
        # The dry run of this rank needs a fake world: before the real one exists.
        from megatron.dryrun.runtime import MemoryReport
        from megatron.initialize import select_device
        memory = MemoryReport.predict(cfg, world_size_from_env(), model_provider,
                                      forward_step_func, select_device(cfg.training.device))
    device = initialize_megatron(cfg)
    exit_signal = _ExitSignal()
    exit_signal.install()
    writer = None
    try:
        model_chunks = build_model(cfg, model_provider, device)
        n_params = sum(p.numel() for c in model_chunks for p in c.parameters())
        print_rank_0(f"model: {n_params / 1e6:.2f} M parameters on this rank "
                     f"(TP {mpu.get_tensor_model_parallel_world_size()}, "
                     f"PP {mpu.get_pipeline_model_parallel_world_size()}, "
                     f"DP {mpu.get_data_parallel_world_size()}), device {device}, "
                     f"precision {cfg.training.precision}")
        optimizer = get_megatron_optimizer(cfg, model_chunks)
        scheduler = build_scheduler(cfg, optimizer)
        iteration, consumed = 0, 0
        if cfg.checkpoint.load:
            with fail_together("loading the checkpoint"):
                iteration, consumed = checkpoint.load_checkpoint(cfg, model_chunks, optimizer,
                                                                    scheduler)
        # Building datasets and data-loader iterators may draw from the global
        # RNGs; keep the (restored) states so a resumed run continues exactly.
        rng_state = checkpoint.get_rng_state()
        datasets = _build_datasets(cfg, datasets_provider)
        writer = build_metrics_writer(cfg, enabled=is_last_rank())
        run = Run(cfg, forward_step_func, model_chunks, optimizer, scheduler,
                  StepSchedule.from_config(cfg), device, writer,
                  *build_data_iterators(cfg, datasets, consumed, device), memory_report=memory)
        history = train(run, iteration, consumed, exit_signal, rng_state)
        if history["exit_reason"] is None:
            finish(run, history, tokenizer)
        return history
    except RuntimeError as e:
        # A hung or dead rank: one line, not a traceback from deep inside a collective.
        if mpu.is_collective_timeout(e):
            raise CollectiveTimeoutError(cfg.training.distributed_timeout_minutes) from None
        if mpu.is_peer_lost(e):
            raise PeerLostError() from None
        raise
    finally:
        if writer is not None:
            writer.close()
        exit_signal.restore()
