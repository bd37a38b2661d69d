"""FLOPs of the ops a step dispatches, by torch's own per-op formulas, without changing the ops.

``torch.utils.flop_counter.FlopCounterMode`` decomposes every op it has no formula for
into ones it has, which changes what runs: CPU's fused attention would become the
math path with its [s, s] matrices, and the dry run would count their memory. This
observer only counts (torch's formulas; CPU's fused attention borrows the formulas of
CUDA's memory-efficient attention, which takes the same shapes).
"""
import torch
from torch.utils.flop_counter import flop_registry

aten = torch.ops.aten

_BORROWED = {
    aten._scaled_dot_product_flash_attention_for_cpu: aten._scaled_dot_product_efficient_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        aten._scaled_dot_product_efficient_attention_backward,
}


class FlopCount:
    """``observe(func, args, kwargs, out)`` adds the FLOPs of each op to ``total``."""

    def __init__(self):
        self.total = 0
        self._formulas = {}  # id(op) -> formula or None (op hashing is slow; this runs per op)

    def observe(self, func, args, kwargs, out):
        """Count one op (ops without a formula, e.g. elementwise ones, count zero)."""
        key = id(func)
        if key not in self._formulas:
            packet = getattr(func, "_overloadpacket", None)
            self._formulas[key] = flop_registry.get(_BORROWED.get(packet, packet))
        formula = self._formulas[key]
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
