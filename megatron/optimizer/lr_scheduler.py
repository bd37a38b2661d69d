"""Learning-rate schedule: linear warmup, then cosine / linear / constant decay."""
import math

_STYLES = ("cosine", "linear", "constant")


class OptimizerParamScheduler:
    """Sets ``lr`` on every param group of ``optimizer`` from the step count.

    ``OptimizerParamScheduler(optimizer, optimizer_cfg, train_iters)`` reads
    ``lr``, ``min_lr``, ``lr_warmup_iters``, ``lr_decay_iters`` (None means
    ``train_iters``) and ``lr_decay_style`` from the config section. Steps are
    counted in successful optimizer steps: as in Megatron, the loop calls
    ``step(increment=1)`` after each iteration whose update was not skipped. As in Megatron, the lr at
    step ``n`` during warmup is ``lr * n / warmup`` (0 for the first iteration),
    then decays from ``lr`` to ``min_lr`` over ``[warmup, decay]`` and stays at
    ``min_lr`` afterwards.
    """

    def __init__(self, optimizer, optimizer_cfg, train_iters=None):
        self.optimizer = optimizer
        self.max_lr = float(optimizer_cfg.lr)
        self.min_lr = float(optimizer_cfg.min_lr)
        self.warmup_steps = int(optimizer_cfg.lr_warmup_iters or 0)
        decay = optimizer_cfg.lr_decay_iters
        if decay is None:
            decay = train_iters
        self.decay_style = optimizer_cfg.lr_decay_style
        if self.decay_style not in _STYLES:
            raise ValueError(f"lr_decay_style must be one of {_STYLES}, got {self.decay_style!r}")
        if decay is None and self.decay_style != "constant":
            raise ValueError("lr_decay_iters is unset and train_iters is unknown: set "
                             "optimizer.lr_decay_iters for the lr decay")
        self.decay_steps = int(decay) if decay is not None else 0
        if not 0.0 <= self.min_lr <= self.max_lr:
            raise ValueError(f"min_lr ({self.min_lr}) must lie between 0 and lr ({self.max_lr})")
        if self.decay_style != "constant" and self.decay_steps < self.warmup_steps:
            raise ValueError(f"lr_decay_iters ({self.decay_steps}) is shorter than "
                             f"lr_warmup_iters ({self.warmup_steps})")
        self.num_steps = 0
        self.step(0)

    def get_lr(self):
        """The learning rate for the current step count."""
        n = self.num_steps
        if self.warmup_steps > 0 and n <= self.warmup_steps:
            return self.max_lr * n / self.warmup_steps
        if self.decay_style == "constant":
            return self.max_lr
        if n >= self.decay_steps:
            return self.min_lr
        ratio = (n - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        if self.decay_style == "linear":
            coeff = 1.0 - ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, increment=1):
        """Advance by ``increment`` iterations and apply the new lr."""
        self.num_steps += increment
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self):
        """Schedule settings and the step count."""
        return {"max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps,
                "decay_style": self.decay_style, "num_steps": self.num_steps}

    def load_state_dict(self, state_dict):
        """Resume the step count; the current config's settings stay in force."""
        self.num_steps = int(state_dict["num_steps"])
        self.step(0)
