"""Plan a run before the allocation: memory per GPU, time per step, the best layout.

- ``layout``: ``ModelShape`` (a config's model) and ``Layout`` (TP x PP x VP x DP, micro
  batch, recompute, sequence parallel, distributed optimizer, precision).
- ``memory_model``: the analytic peak bytes of each pipeline rank (``rank_memory``,
  ``peak_memory``), read off this code; ``validation`` and ``measure`` check it against
  real CPU steps.
- ``hardware``: GPU profiles (``hardware.yaml``, each number with its source).
- ``time_model``: predicted seconds per step (``step_time``), one calibrated number
  (``calibrated_efficiency``, the Megatron-LM paper's 1.2B baseline); ``paper``: the
  paper's weak-scaling study.
- ``planner``: enumerate, fit and rank layouts (``tools/plan_layout.py``).
- ``flops``: model FLOPs of a step (the log's TFLOP/s and MFU, the benches).

See docs/scaling.md.
"""
from megatron.planning.hardware import HardwareProfile, get_profile
from megatron.planning.layout import Layout, ModelShape
from megatron.planning.memory_model import RankMemory, peak_memory, rank_memory
from megatron.planning.time_model import StepTime, calibrated_efficiency, step_time

__all__ = ["HardwareProfile", "get_profile", "Layout", "ModelShape", "RankMemory",
           "peak_memory", "rank_memory", "StepTime", "calibrated_efficiency", "step_time"]
