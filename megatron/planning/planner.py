"""The layout planner: every layout that divides the model and the cluster, what fits, fastest first.

``enumerate_layouts`` lists TP x PP x VP x DP x micro batch x recompute x
sequence parallel x distributed optimizer for a global batch on N GPUs (the
config's own validation, ``megatron.config.finalize``, says what divides);
``plan`` predicts each one's peak memory per GPU (the memory model, CUDA
kernels) and step time (the time model), drops what does not fit and ranks the
rest. ``overlay_yaml`` writes a plan as a config overlay for ``pretrain_gpt.py
--config base.yaml --config overlay.yaml``.
"""
from dataclasses import dataclass

import yaml

from megatron.config import ConfigError
from megatron.planning.layout import Layout, config_for
from megatron.planning.memory_model import peak_memory
from megatron.planning.time_model import step_time

RECOMPUTE = ("none", "selective", "full")


def _divisors(n):
    return [k for k in range(1, n + 1) if n % k == 0]


@dataclass
class Plan:
    """One layout with its predicted peak memory per GPU (``RankMemory``) and ``StepTime``."""
    layout: Layout
    memory: object
    time: object
    fits: bool


def enumerate_layouts(cfg, shape, num_gpus, global_batch, max_micro_batch=16, max_vp=8):
    """Every layout of ``shape`` on ``num_gpus`` with ``global_batch`` samples per step that
    the config validation accepts (precision and grad dtype as in ``cfg``)."""
    t_cfg, p_cfg = cfg.training, cfg.parallel
    heads, layers = shape.num_attention_heads, shape.num_layers
    out = []
    for tp in _divisors(num_gpus):
        if heads % tp or shape.ffn_hidden_size % tp:
            continue
        for pp in _divisors(num_gpus // tp):
            if layers % pp:
                continue
            dp = num_gpus // (tp * pp)
            if global_batch % dp:
                continue
            for mb in _divisors(global_batch // dp):
                if mb > max_micro_batch:
                    break
                m = global_batch // (dp * mb)
                vps = [1] + ([v for v in _divisors(layers // pp) if 1 < v <= max_vp]
                             if pp > 1 and m % pp == 0 else [])
                for vp in vps:
                    for recompute in RECOMPUTE:
                        for sp in ((False, True) if tp > 1 else (False,)):
                            for do in ((False, True) if dp > 1 else (False,)):
                                out.append(Layout(
                                    tp=tp, pp=pp, dp=dp, vp=vp, micro_batch=mb,
                                    num_microbatches=m, recompute=recompute,
                                    sequence_parallel=sp, distributed_optimizer=do,
                                    precision=t_cfg.precision,
                                    grad_fp32=p_cfg.accumulate_allreduce_grads_in_fp32))
    # The config's own checks have the last word (one per distinct parallel shape).
    checked, valid = {}, []
    for lay in out:
        key = (lay.tp, lay.pp, lay.vp, lay.micro_batch, lay.sequence_parallel)
        if key not in checked:
            try:
                config_for(cfg, lay)
                checked[key] = True
            except ConfigError:
                checked[key] = False
        if checked[key]:
            valid.append(lay)
    return valid


def evaluate(shape, layout, hw, compute_efficiency, gpus_per_node, memory_limit):
    """The ``Plan`` of one layout."""
    mem = peak_memory(shape, layout, device="cuda")
    time = step_time(shape, layout, hw, compute_efficiency, gpus_per_node)
    return Plan(layout, mem, time, mem.total <= memory_limit)


def plan(cfg, shape, num_gpus, hw, compute_efficiency, global_batch, gpus_per_node=None,
         memory_fraction=0.9, max_micro_batch=16):
    """All candidate layouts as ``Plan``s, fitting ones first, each group fastest first.
    ``memory_fraction`` of the GPU's memory is usable (the rest: CUDA context, allocator
    fragmentation, NCCL buffers)."""
    limit = memory_fraction * hw.memory_bytes
    plans = [evaluate(shape, lay, hw, compute_efficiency, gpus_per_node, limit)
             for lay in enumerate_layouts(cfg, shape, num_gpus, global_batch, max_micro_batch)]
    plans.sort(key=lambda p: (not p.fits, p.time.total, p.memory.total))
    return plans


def overlay_yaml(best, header_lines=()):
    """A config overlay (YAML text) of the parallel and training fields of ``best``'s layout."""
    sections = {}
    for key, value in best.layout.overrides().items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    head = "".join(f"# {line}\n" for line in header_lines)
    return head + yaml.safe_dump(sections, sort_keys=False, default_flow_style=False)
