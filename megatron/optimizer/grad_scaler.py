"""Loss scalers for fp16 training: constant and dynamic (Megatron's semantics).

The scale is kept as a Python float: it is always a power of two times the
configured constants, multiplying a loss by it is exact, and the state dict
restores it bit for bit.
"""


class ConstantGradScaler:
    """A fixed loss scale; overflowing steps are still skipped by the optimizer."""

    def __init__(self, scale):
        if not scale > 0:
            raise ValueError(f"loss_scale must be positive, got {scale}")
        self.scale = float(scale)

    @property
    def inv_scale(self):
        """1 / scale, by which gradients are unscaled."""
        return 1.0 / self.scale

    def update(self, found_inf):
        """Nothing to adapt."""

    def state_dict(self):
        """The scale (for checkpoints)."""
        return {"scale": self.scale}

    def load_state_dict(self, state_dict):
        """Restore the scale."""
        self.scale = float(state_dict["scale"])


class DynamicGradScaler(ConstantGradScaler):
    """Loss scale that backs off on overflows and grows after clean stretches.

    Each overflow decrements a hysteresis tracker; only when it reaches zero is
    the scale multiplied by ``backoff_factor`` (never below ``min_scale``). After
    ``growth_interval`` consecutive clean steps the scale is multiplied by
    ``growth_factor`` and the hysteresis tracker is reset. An overflow resets
    the clean-step counter.
    """

    def __init__(self, initial_scale=2.0 ** 32, min_scale=1.0, growth_factor=2.0,
                 backoff_factor=0.5, growth_interval=1000, hysteresis=2):
        super().__init__(initial_scale)
        if not 0 < min_scale <= initial_scale:
            raise ValueError(f"min_loss_scale ({min_scale}) must be positive and at most "
                             f"initial_loss_scale ({initial_scale})")
        if not growth_factor > 1 or not 0 < backoff_factor < 1:
            raise ValueError(f"growth_factor ({growth_factor}) must exceed 1 and backoff_factor "
                             f"({backoff_factor}) lie in (0, 1)")
        if growth_interval < 1 or hysteresis < 1:
            raise ValueError(f"loss_scale_window ({growth_interval}) and hysteresis "
                             f"({hysteresis}) must be at least 1")
        self.min_scale = float(min_scale)
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self.growth_tracker = 0
        self.hysteresis_tracker = self.hysteresis

    def update(self, found_inf):
        """Advance the state machine by one step; ``found_inf`` is a bool."""
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale = self.scale * self.growth_factor

    def state_dict(self):
        """Scale and both trackers."""
        return {"scale": self.scale, "growth_tracker": self.growth_tracker,
                "hysteresis_tracker": self.hysteresis_tracker}

    def load_state_dict(self, state_dict):
        """Restore scale and trackers."""
        self.scale = float(state_dict["scale"])
        self.growth_tracker = int(state_dict["growth_tracker"])
        self.hysteresis_tracker = int(state_dict["hysteresis_tracker"])
