"""The training loop: batches -> schedule -> optimizer step -> log / evaluate / save.

`pretrain(cfg, model_provider, datasets_provider, forward_step_func)` is the one
entry point (see docs/architecture.md for the contracts of the three callables).
"""
import math
import signal
import time

import torch

from megatron import checkpointing
from megatron.config import finalize
from megatron.errors import UserError
from megatron.initialize import initialize_megatron, world_size_from_env
from megatron.logging import TensorBoardWriter, Timers, is_last_rank, print_rank_0, print_rank_last
from megatron.mpu.collectives import fail_together
from megatron.utils import DTYPES, average_over_data_parallel, calc_params_l2_norm, generate_sample


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
        model = model.to(device=device, dtype=DTYPES[cfg.training.precision])
        chunks.append(DistributedDataParallel(
            model, accumulate_allreduce_grads_in_fp32=cfg.parallel.accumulate_allreduce_grads_in_fp32,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer))
    if vp > 1:
        mpu.set_virtual_pipeline_model_parallel_rank(0)
    return chunks


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
    """Loaders for train/valid/test; train starts at `consumed_samples` (exact resume).

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


def _mean_loss_tensor(loss_dicts, device, key="lm loss"):
    """Mean of the micro batches' `key` losses as one 0-d tensor on `device` (no host sync).

    float64 on the CPU, float32 on accelerators (as `average_over_data_parallel`);
    NaN when no micro batch reported the key (not the last pipeline stage).
    """
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    values = [torch.as_tensor(d[key]).detach().reshape(()).to(device=device, dtype=torch.float64)
              for d in loss_dicts if key in d]
    if not values:
        return torch.full((), float("nan"), dtype=dtype, device=device)
    return torch.stack(values).mean().to(dtype)


def _mean_loss(loss_dicts, device, key="lm loss"):
    return _mean_loss_tensor(loss_dicts, device, key).item()


def evaluate(cfg, forward_step_func, valid_factory, model_chunks, device):
    """Mean lm loss over `eval_iters` global batches of the validation set (fresh start each time).

    Always the same first batches, so validation losses are comparable over time.
    """
    from megatron.schedules import get_forward_backward_func
    for c in model_chunks:
        c.eval()
    forward_backward = get_forward_backward_func()
    data_iter = _iterators(valid_factory, len(model_chunks))
    total = []
    with torch.no_grad():
        for _ in range(cfg.training.eval_iters):
            dicts = forward_backward(forward_step_func, data_iter, model_chunks,
                                     cfg.num_microbatches(world_size_from_env()),
                                     cfg.model.seq_length, cfg.training.micro_batch_size,
                                     forward_only=True)
            total.append(_mean_loss(dicts, device))
    for c in model_chunks:
        c.train()
    loss = average_over_data_parallel([sum(total) / max(len(total), 1)], device)[0]
    return loss


def _log_eval(name, iteration, consumed, loss, writer):
    ppl = math.exp(min(20.0, loss)) if math.isfinite(loss) else float("nan")
    line = f" {name} loss at iteration {iteration} | lm loss value: {loss:.6E} | lm loss PPL: {ppl:.6E} |"
    print_rank_last("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
    writer.add_scalar(f"lm loss {name}", loss, iteration, consumed)
    writer.add_scalar(f"lm loss {name} ppl", ppl, iteration, consumed)


def _step_scalars(loss_dicts, is_last_stage, exit_signal, start_time, cfg, device):
    """One all-reduce and one host transfer per iteration for every per-step scalar.

    Returns `(loss, sigterm, duration)`, agreed by every rank: `loss` is the
    iteration's lm loss averaged over data parallelism (each last-stage rank
    contributes its micro-batch mean / its number of replicas, i.e. world / PP;
    a non-finite loss anywhere makes it non-finite everywhere), `sigterm` and
    `duration` are the stop flags (any rank), so all ranks stop together.
    """
    from megatron import mpu
    t = cfg.training
    duration = (t.exit_duration_in_mins is not None
                and (time.time() - start_time) / 60.0 > t.exit_duration_in_mins)
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    world = mpu.get_global_world_size()
    if is_last_stage:
        loss = _mean_loss_tensor(loss_dicts, device)
        if world > 1:
            loss = loss / (world // mpu.get_pipeline_model_parallel_world_size())
    else:
        loss = torch.zeros((), dtype=dtype, device=device)
    flags = torch.tensor([float(exit_signal.received), float(duration)], dtype=dtype,
                         device=device)
    scalars = torch.cat([loss.reshape(1), flags])
    mpu.all_reduce(scalars)  # SUM: the DP mean, and "any rank" for flags
    loss, sigterm, dur = scalars.tolist()
    return loss, sigterm > 0, dur > 0


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


def train(cfg, forward_step_func, model_chunks, optimizer, scheduler, train_factory,
          valid_factory, device, iteration, consumed_samples, exit_signal, rng_state=None):
    """Run optimizer steps until train_iters / an exit condition; return the history."""
    from megatron import mpu
    from megatron.mpu.distributed import finalize_model_grads
    from megatron.schedules import get_forward_backward_func

    t, lg = cfg.training, cfg.logging
    world = world_size_from_env()
    num_micro = cfg.num_microbatches(world)
    gbs = t.global_batch_size
    forward_backward = get_forward_backward_func()
    writer = TensorBoardWriter(lg.tensorboard_dir, enabled=is_last_rank())
    timers = Timers()
    # A resumed run that has already reached train_iters reads no batch; its
    # sampler would also refuse a start at the end of an exactly sized dataset.
    train_iter = (_iterators(train_factory, len(model_chunks))
                  if iteration < t.train_iters else None)
    if rng_state is not None:
        checkpointing.set_rng_state(rng_state)
    history = {"train_losses": {}, "grad_norms": {}, "valid_losses": {}, "exit_reason": None}

    for c in model_chunks:
        c.train()
    start_time = time.time()
    last_stage = mpu.is_pipeline_last_stage(ignore_virtual=True)
    window = {"loss": 0.0, "count": 0, "skipped": 0, "nan": 0}
    total_skipped = 0
    nonfinite_run = 0
    if iteration == 0 and valid_factory is not None and t.eval_iters > 0:
        # The starting point of the validation curve (about ln(vocab) for a fresh model).
        vloss = evaluate(cfg, forward_step_func, valid_factory, model_chunks, device)
        history["valid_losses"][0] = vloss
        _log_eval("validation", 0, consumed_samples, vloss, writer)
    timers("interval").start()
    last_log_iteration = iteration
    print_rank_0(f"training: iterations {iteration} -> {t.train_iters}, global batch {gbs}, "
                 f"micro batch {t.micro_batch_size}, {num_micro} micro batches per step, "
                 f"data-parallel size {mpu.get_data_parallel_world_size()}")
    while iteration < t.train_iters:
        # Also zeroes every chunk's DDP grad buffer (MegatronOptimizer.zero_grad).
        optimizer.zero_grad()
        loss_dicts = forward_backward(forward_step_func, train_iter, model_chunks, num_micro,
                                      cfg.model.seq_length, t.micro_batch_size,
                                      forward_only=False, grad_scale_func=optimizer.scale_loss)
        finalize_model_grads(model_chunks)
        update_successful, grad_norm, num_zeros = optimizer.step()
        if update_successful:
            scheduler.step(1)
        else:
            total_skipped += 1
            window["skipped"] += 1
        iteration += 1
        consumed_samples += gbs
        # Every rank has the global norm (None when clipping is off).
        history["grad_norms"][iteration] = None if grad_norm is None else float(grad_norm)

        # The loss is only known on the last pipeline stage; the one per-step
        # all-reduce shares its DP mean (and the stop flags) with every rank.
        loss, sigterm, duration = _step_scalars(loss_dicts, last_stage, exit_signal, start_time,
                                                cfg, device)
        if last_stage:
            history["train_losses"][iteration] = loss
        if math.isfinite(loss):
            nonfinite_run = 0
            if last_stage:
                window["loss"] += loss
                window["count"] += 1
        else:
            nonfinite_run += 1
            if last_stage:
                window["nan"] += 1
        # Every rank counts the same run of non-finite losses, so all stop together.
        if nonfinite_run >= t.max_nonfinite_losses:
            writer.close()
            raise TrainingError(f"lm loss was not finite for {nonfinite_run} consecutive "
                                f"iterations (training.max_nonfinite_losses="
                                f"{t.max_nonfinite_losses}) at iteration {iteration}: lower "
                                f"optimizer.lr={cfg.optimizer.lr} or check the data")

        lr = scheduler.get_lr() if hasattr(scheduler, "get_lr") else optimizer.param_groups[0]["lr"]
        if iteration % lg.log_interval == 0:
            # A resumed run's first window can be shorter than log_interval.
            elapsed = timers("interval").elapsed() / max(iteration - last_log_iteration, 1)
            last_log_iteration = iteration
            tokens_per_sec = gbs * cfg.model.seq_length / max(elapsed, 1e-9)
            params_norm = calc_params_l2_norm(model_chunks)
            avg = window["loss"] / window["count"] if window["count"] else float("nan")
            scale = float(optimizer.get_loss_scale())
            gn = float(grad_norm) if grad_norm is not None else float("nan")
            writer.add_scalar("lm loss", avg, iteration, consumed_samples)
            writer.add_scalar("learning-rate", lr, iteration, consumed_samples)
            writer.add_scalar("grad-norm", gn, iteration, consumed_samples)
            writer.add_scalar("tokens-per-sec", tokens_per_sec, iteration, consumed_samples)
            writer.add_scalar("iteration-time", elapsed, iteration, consumed_samples)
            writer.add_scalar("params-norm", params_norm, iteration, consumed_samples)
            writer.add_scalar("loss-scale", scale, iteration, consumed_samples)
            writer.add_scalar("skipped-iterations", window["skipped"], iteration, consumed_samples)
            print_rank_last(
                f" iteration {iteration:8d}/{t.train_iters:8d} | consumed samples: {consumed_samples:12d}"
                f" | elapsed time per iteration (ms): {elapsed * 1000.0:.1f}"
                f" | throughput (tokens/s): {tokens_per_sec:.1f} | learning rate: {lr:.3E}"
                f" | global batch size: {gbs:5d} | lm loss: {avg:.6E} | loss scale: {scale:.1f}"
                f" | grad norm: {gn:.3f} | params norm: {params_norm:.3f}"
                f" | number of skipped iterations: {window['skipped']:3d}"
                f" | number of nan iterations: {window['nan']:3d} |")
            window = {"loss": 0.0, "count": 0, "skipped": 0, "nan": 0}
            writer.flush()

        if (valid_factory is not None and t.eval_iters > 0 and iteration % t.eval_interval == 0
                and iteration < t.train_iters):
            vloss = evaluate(cfg, forward_step_func, valid_factory, model_chunks, device)
            history["valid_losses"][iteration] = vloss
            _log_eval("validation", iteration, consumed_samples, vloss, writer)

        ck = cfg.checkpoint
        saved = False
        if ck.save and ck.save_interval and iteration % ck.save_interval == 0:
            checkpointing.save_checkpoint(cfg, iteration, consumed_samples, model_chunks, optimizer,
                                          scheduler)
            saved = True
        reason = None
        if sigterm:
            reason = "SIGTERM received"
        elif duration:
            reason = f"training.exit_duration_in_mins={t.exit_duration_in_mins} reached"
        elif t.exit_interval and iteration % t.exit_interval == 0 and iteration < t.train_iters:
            reason = f"training.exit_interval={t.exit_interval} reached"
        if reason:
            if ck.save and not saved:
                checkpointing.save_checkpoint(cfg, iteration, consumed_samples, model_chunks,
                                              optimizer, scheduler)
            print_rank_0(f"exiting at iteration {iteration}: {reason}")
            history["exit_reason"] = reason
            break
    writer.flush()
    history.update(iteration=iteration, consumed_samples=consumed_samples, writer=writer,
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

    world = world_size_from_env()
    finalize(cfg, world)  # layout errors before any process group exists
    device = initialize_megatron(cfg)
    exit_signal = _ExitSignal()
    exit_signal.install()
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
                iteration, consumed = checkpointing.load_checkpoint(cfg, model_chunks, optimizer,
                                                                    scheduler)
        # Building datasets and data-loader iterators may draw from the global
        # RNGs; keep the (restored) states so a resumed run continues exactly.
        rng_state = checkpointing.get_rng_state()
        datasets = _build_datasets(cfg, datasets_provider)
        train_f, valid_f, test_f = build_data_iterators(cfg, datasets, consumed, device)
        history = train(cfg, forward_step_func, model_chunks, optimizer, scheduler, train_f,
                        valid_f, device, iteration, consumed, exit_signal, rng_state)
        writer = history.pop("writer")
        if history["exit_reason"] is None:
            it, consumed = history["iteration"], history["consumed_samples"]
            if valid_f is not None and it > 0 and cfg.training.eval_iters > 0:
                vloss = evaluate(cfg, forward_step_func, valid_f, model_chunks, device)
                history["valid_losses"][it] = vloss
                _log_eval("validation", it, consumed, vloss, writer)
            ck = cfg.checkpoint
            if ck.save and it > 0 and _on_rank_0(
                    lambda: checkpointing.read_latest_iteration(ck.save) != it, device):
                checkpointing.save_checkpoint(cfg, it, consumed, model_chunks, optimizer, scheduler)
            if test_f is not None and it > 0 and cfg.training.eval_iters > 0:
                # Once, on the held-out test split, after the final save.
                tloss = evaluate(cfg, forward_step_func, test_f, model_chunks, device)
                history["test_loss"] = tloss
                _log_eval("test", it, consumed, tloss, writer)
            if (tokenizer is not None and cfg.training.sample_prompt
                    and mpu.get_pipeline_model_parallel_world_size() == 1):
                text = generate_sample(model_chunks[0], tokenizer, cfg.training.sample_prompt,
                                       cfg.training.sample_tokens, cfg.model.seq_length, device,
                                       top_k=cfg.training.sample_top_k, seed=cfg.training.seed)
                print_rank_0(f"sample from the final model:\n{text}")
                history["sample"] = text
        writer.close()
        return history
    finally:
        exit_signal.restore()
