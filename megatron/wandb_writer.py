"""Weights & Biases logging of the training scalars (Megatron-LM's --wandb-* flags).

The scalars are TensorBoard's (``lm loss``, ``learning-rate``, ``grad-norm``, ...):
the run's step is the iteration, and every scalar written for one iteration lands in
one history row, with ``consumed-samples`` beside them (W&B plots any key as the x
axis, so TensorBoard's ``<tag> vs samples`` twins are not repeated). The resolved
config is the run's config.

W&B must never stop training: a run that cannot reach the service starts again in
offline mode (``wandb sync`` uploads it later), a failing ``log`` turns W&B off with
one warning, and closing waits a bounded time for uploads. ``WANDB_MODE=offline``
and ``WANDB_MODE=disabled`` work as in any W&B program.
"""
import os
import sys
import threading

from megatron.optional_deps import require

FINISH_TIMEOUT_S = 120.0  # how long closing waits for W&B's uploads before training exits
DEFAULT_INIT_TIMEOUT_S = 30.0  # W&B's own default (90 s) is a long wait at start-up


def _warn(message):
    print(f"warning: W&B: {message}", file=sys.stderr, flush=True)


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def wandb_save_dir(logging_cfg, save=None):
    """Megatron-LM's rule: ``wandb_save_dir``, else ``<save>/wandb``, else ``./wandb``."""
    if logging_cfg.wandb_save_dir:
        return logging_cfg.wandb_save_dir
    return os.path.join(save, "wandb") if save else "wandb"


def import_wandb():
    """The wandb module, or a one-line error naming the ``[wandb]`` extra."""
    return require("wandb", "wandb", "logging.wandb_project (Weights & Biases logging)")


class WandbWriter:
    """Writes scalars to one W&B run (``add_scalar``/``flush``/``close``, as TensorBoardWriter);
    a no-op without a project or when not ``enabled`` (every rank but the last)."""

    def __init__(self, project, exp_name=None, save_dir="wandb", config=None, enabled=True):
        self._run = None
        self._row, self._step = {}, None
        self._dir = save_dir
        if not (project and enabled):
            return
        wandb = import_wandb()
        os.makedirs(save_dir, exist_ok=True)
        kwargs = dict(project=project, name=exp_name, dir=save_dir, config=config)
        settings = {}
        if "WANDB_INIT_TIMEOUT" not in os.environ:
            settings["init_timeout"] = DEFAULT_INIT_TIMEOUT_S
        try:
            self._run = wandb.init(**kwargs, settings=wandb.Settings(**settings))
        except Exception as e:  # the service is unreachable, refuses the key, times out, ...
            _warn(f"cannot start the run ({_first_line(e)}); logging offline to {save_dir} instead "
                  f"(`wandb sync` uploads it later)")
            try:
                self._run = wandb.init(**kwargs, mode="offline")
            except Exception as e2:
                _warn(f"cannot start an offline run either ({_first_line(e2)}); training goes on without W&B")
                self._run = None

    @property
    def enabled(self):
        """True while scalars go to a W&B run."""
        return self._run is not None

    def add_scalar(self, tag, value, iteration, consumed_samples=None):
        """Add ``tag`` to the history row of ``iteration`` (written at ``flush``)."""
        if self._run is None:
            return
        if self._step is not None and iteration != self._step:
            self.flush()
        self._step = iteration
        self._row[tag] = float(value)
        if consumed_samples is not None:
            self._row["consumed-samples"] = int(consumed_samples)

    def flush(self):
        """Hand the pending row to W&B (it commits the row when a later step arrives or at close)."""
        if self._run is None or not self._row:
            return
        row, self._row = self._row, {}
        try:
            self._run.log(row, step=self._step)
        except Exception as e:
            _warn(f"logging failed ({_first_line(e)}); training goes on without W&B")
            self._run = None  # finishing a broken run could wait on it too

    def close(self):
        """Flush and finish the run, waiting at most FINISH_TIMEOUT_S for its uploads."""
        if self._run is None:
            return
        self.flush()
        run, self._run = self._run, None
        errors = []

        def finish():
            try:
                run.finish()
            except Exception as e:
                errors.append(e)

        t = threading.Thread(target=finish, name="wandb-finish", daemon=True)
        t.start()
        t.join(FINISH_TIMEOUT_S)
        if t.is_alive():
            _warn(f"still uploading after {FINISH_TIMEOUT_S:.0f} s; the run's files are under {self._dir} "
                  "(`wandb sync` uploads them)")
        elif errors:
            _warn(f"finishing the run failed ({_first_line(errors[0])}); its files are under {self._dir}")
