"""What the training loop reports: the periodic log line and the evaluation lines.

Console lines keep Megatron-LM's format; TensorBoard gets the same scalars
(``lm loss``, ``learning-rate``, ``grad-norm``, ...), each also against
consumed samples. Throughput is also given in model TFLOP/s per device
(``tflops-per-device``; Megatron-LM's "throughput per GPU (TFLOP/s/GPU)", the
FLOPs of ``megatron.planning.flops`` without recomputation) and as MFU
(``mfu``) against ``training.hardware``'s peak, or against a GEMM peak measured
once, at the first log line, when no profile is named.
"""
import math

from megatron import mpu
from megatron.logging import Timer, is_last_rank, print_rank_last
from megatron.utils import calc_params_l2_norm, perplexity, unwrap_model


def device_peak_flops(cfg, device):
    """Peak FLOP/s of one device for MFU: ``training.hardware``'s dense peak in the run's
    precision, else a GEMM measured on ``device`` (once per process)."""
    if cfg.training.hardware:
        from megatron.planning.hardware import get_profile
        return get_profile(cfg.training.hardware).peak(cfg.training.precision)
    from megatron.planning.measure import startup_peak_flops
    return startup_peak_flops(device.type)


def model_flops_per_iteration(run):
    """Model FLOPs of one step of ``run`` (all devices, recomputation not counted)."""
    from megatron.planning.flops import model_flops_per_iteration as flops_of
    vocab = unwrap_model(run.model_chunks[0]).padded_vocab_size
    return flops_of(run.cfg.model, run.cfg.training.global_batch_size, vocab)


class LogWindow:
    """The iterations between two log lines: their finite losses (last pipeline stage),
    skipped (fp16 overflow) and non-finite iterations, and the wall time they took."""

    def __init__(self, iteration):
        self.start_iteration = iteration
        self.timer = Timer("interval")
        self.timer.start()
        self.peak_flops = None
        self._reset()

    def _reset(self):
        self.loss_sum, self.loss_count, self.skipped, self.nonfinite = 0.0, 0, 0, 0

    def add(self, loss, skipped, last_stage):
        """Record one iteration's (DP-averaged) loss and whether its update was skipped."""
        self.skipped += int(skipped)
        if not last_stage:
            return
        if math.isfinite(loss):
            self.loss_sum += loss
            self.loss_count += 1
        else:
            self.nonfinite += 1

    def emit(self, run, iteration, consumed_samples, grad_norm, lr):
        """Print the log line (last rank), write the TensorBoard scalars, start a new window."""
        cfg, writer = run.cfg, run.writer
        gbs = cfg.training.global_batch_size
        # A resumed run's first window can be shorter than log_interval.
        elapsed = self.timer.elapsed() / max(iteration - self.start_iteration, 1)
        self.start_iteration = iteration
        tokens_per_sec = gbs * cfg.model.seq_length / max(elapsed, 1e-9)
        if self.peak_flops is None and (is_last_rank() or writer.enabled):
            self.peak_flops = device_peak_flops(cfg, run.device)
            self.timer.start()  # a measured peak's GEMMs are not training time
        tflops = (model_flops_per_iteration(run) / max(elapsed, 1e-9)
                  / mpu.get_global_world_size() / 1e12)
        mfu = tflops * 1e12 / self.peak_flops if self.peak_flops else float("nan")
        params_norm = calc_params_l2_norm(run.model_chunks)
        avg = self.loss_sum / self.loss_count if self.loss_count else float("nan")
        scale = float(run.optimizer.get_loss_scale())
        gn = float(grad_norm) if grad_norm is not None else float("nan")
        for tag, value in (("lm loss", avg), ("learning-rate", lr), ("grad-norm", gn),
                           ("tokens-per-sec", tokens_per_sec), ("iteration-time", elapsed),
                           ("params-norm", params_norm), ("loss-scale", scale),
                           ("skipped-iterations", self.skipped),
                           ("tflops-per-device", tflops), ("mfu", mfu)):
            writer.add_scalar(tag, value, iteration, consumed_samples)
        print_rank_last(
            f" iteration {iteration:8d}/{cfg.training.train_iters:8d} | consumed samples: {consumed_samples:12d}"
            f" | elapsed time per iteration (ms): {elapsed * 1000.0:.1f}"
            f" | throughput (tokens/s): {tokens_per_sec:.1f}"
            f" | throughput per GPU (TFLOP/s/GPU): {tflops:.3f} | MFU: {mfu:.3f}"
            f" | learning rate: {lr:.3E}"
            f" | global batch size: {gbs:5d} | lm loss: {avg:.6E} | loss scale: {scale:.1f}"
            f" | grad norm: {gn:.3f} | params norm: {params_norm:.3f}"
            f" | number of skipped iterations: {self.skipped:3d}"
            f" | number of nan iterations: {self.nonfinite:3d} |")
        writer.flush()
        self._reset()


def log_evaluation(writer, name, iteration, consumed_samples, loss):
    """The boxed ``<name> loss at iteration N`` line and its TensorBoard scalars."""
    ppl = perplexity(loss)
    line = (f" {name} loss at iteration {iteration} | lm loss value: {loss:.6E} | "
            f"lm loss PPL: {ppl:.6E} |")
    print_rank_last("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
    writer.add_scalar(f"lm loss {name}", loss, iteration, consumed_samples)
    writer.add_scalar(f"lm loss {name} ppl", ppl, iteration, consumed_samples)
