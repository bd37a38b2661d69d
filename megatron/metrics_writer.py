"""The training loop's one metrics writer: every scalar goes to each backend that is on.

``training_log.py`` writes through one ``add_scalar(tag, value, iteration,
consumed_samples)`` / ``flush`` / ``close`` interface; TensorBoard
(``logging.tensorboard_dir``) and Weights & Biases (``logging.wandb_project``) each
implement it, so adding a backend never adds a code path to the loop.
"""
from megatron.logging import TensorBoardWriter
from megatron.wandb_writer import WandbWriter, import_wandb, wandb_save_dir


class MetricsWriter:
    """Fans each call out to the writers that are enabled (none: every call is a no-op)."""

    def __init__(self, writers):
        self._writers = [w for w in writers if w.enabled]

    @property
    def enabled(self):
        """True when at least one backend writes."""
        return bool(self._writers)

    def add_scalar(self, tag, value, iteration, consumed_samples=None):
        """Log ``tag`` at ``iteration`` (and against consumed samples) in every backend."""
        for w in self._writers:
            w.add_scalar(tag, value, iteration, consumed_samples)

    def flush(self):
        """Flush every backend."""
        for w in self._writers:
            w.flush()

    def close(self):
        """Close every backend."""
        for w in self._writers:
            w.close()


def build_metrics_writer(cfg, enabled):
    """TensorBoard and W&B writers of ``cfg.logging`` (active where ``enabled``: the last rank).

    Every rank checks that wandb is importable when a project is set, so a missing
    package stops all ranks with the same one-line error instead of one rank alone."""
    log = cfg.logging
    if log.wandb_project:
        import_wandb()
    tensorboard = TensorBoardWriter(log.tensorboard_dir, enabled=enabled)
    wandb = WandbWriter(log.wandb_project, log.wandb_exp_name, wandb_save_dir(log, cfg.checkpoint.save),
                        config=cfg.to_dict(), enabled=enabled)
    return MetricsWriter([tensorboard, wandb])
