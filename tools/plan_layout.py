"""Plan the parallel layout of a run before the allocation: what fits, how fast, best first.

Example:
    python tools/plan_layout.py --config configs/gpt2_8.3b.yaml --gpus 512 \\
        --gpus-per-node 16 --hardware V100-32GB [--global-batch 512] [--emit best.yaml]

Enumerates TP x PP x VP x DP x micro batch x recompute x sequence parallel x
distributed optimizer that divide the model and the cluster, drops what does
not fit in the GPU's memory (the analytic memory model), ranks the rest by
predicted seconds per iteration (the time model) and prints the top ones with
memory per GPU, tokens/s per GPU and MFU, then how the config's own layout
compares. ``--emit`` writes the best as a config overlay:
``pretrain_gpt.py --config C --config best.yaml``. See docs/scaling.md.
"""
import argparse
import sys

from megatron.cli import command
from megatron.errors import UserError

GIB = 2 ** 30


def _row(rank, p):
    mem, t = p.memory, p.time
    return (f"{rank:>4} {p.layout.describe():<38} {mem.total / GIB:>8.1f} "
            f"{t.total:>8.3f} {t.tokens_per_s_per_device:>10.0f} {t.tflops_per_device:>8.1f} "
            f"{t.mfu:>6.3f}")


@command
def main(argv=None):
    """Parse arguments, plan, print the table (and write the overlay); user errors: one line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="model config (YAML)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs of the job")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node (default: the hardware profile's)")
    p.add_argument("--hardware", required=True,
                   help="profile name (V100-32GB, A100-80GB, H100-80GB, H200) or a profiles .yaml")
    p.add_argument("--global-batch", type=int, default=None,
                   help="samples per step (default: the config's training.global_batch_size)")
    p.add_argument("--emit", default=None, help="write the best layout as a config overlay here")
    p.add_argument("--top", type=int, default=10, help="rows to print")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="the tokenizer's vocabulary (default: the tokenizer's, or GPT-2's)")
    p.add_argument("--compute-efficiency", type=float, default=None,
                   help="fraction of peak FLOP/s the GEMMs reach (default: calibrated on the "
                        "Megatron-LM paper's V100 baseline)")
    p.add_argument("--memory-fraction", type=float, default=0.9,
                   help="usable fraction of the GPU's memory")
    p.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = p.parse_args(argv)
    if args.gpus < 1 or (args.gpus_per_node is not None and args.gpus_per_node < 1):
        raise UserError(f"--gpus {args.gpus} and --gpus-per-node {args.gpus_per_node} must be "
                        f"positive")
    if not 0 < args.memory_fraction <= 1:
        raise UserError(f"--memory-fraction {args.memory_fraction} must be in (0, 1]")

    from megatron.config import load_config
    from megatron.planning.hardware import get_profile
    from megatron.planning.layout import Layout, ModelShape, true_vocab_size
    from megatron.planning.planner import evaluate, overlay_yaml, plan
    from megatron.planning.time_model import calibrated_efficiency
    from megatron.checkpoint.files import atomic_write

    cfg = load_config(args.config, args.overrides)
    hw = get_profile(args.hardware)
    hw.peak(cfg.training.precision)  # a precision the GPU lacks fails here, in one line
    G = args.gpus_per_node or hw.gpus_per_node
    gbs = args.global_batch or cfg.training.global_batch_size
    if gbs is None:
        raise UserError("give --global-batch (the config sets no training.global_batch_size)")
    shape = ModelShape.from_config(cfg, true_vocab_size(cfg, args.vocab_size))
    f = args.compute_efficiency or calibrated_efficiency()
    plans = plan(cfg, shape, args.gpus, hw, f, gbs, G, args.memory_fraction)
    fitting = [q for q in plans if q.fits]
    limit = args.memory_fraction * hw.memory_bytes
    print(f"{args.config}: {shape.num_parameters() / 1e9:.2f} B parameters, global batch {gbs}, "
          f"{cfg.training.precision}; {args.gpus} x {hw.name} ({G} per node, "
          f"{limit / GIB:.1f} GiB usable each); compute at {f:.3f} of peak")
    print(f"{len(plans)} layouts divide the model and the cluster, {len(fitting)} fit in memory")
    if not fitting:
        smallest = min(plans, key=lambda q: q.memory.total) if plans else None
        need = f"; the smallest needs {smallest.memory.total / GIB:.1f} GiB " \
               f"({smallest.layout.describe()})" if smallest else ""
        raise UserError(f"no layout of {args.config} on {args.gpus} x {hw.name} fits in "
                        f"{limit / GIB:.1f} GiB per GPU{need}")
    print(f"{'rank':>4} {'layout':<38} {'GiB/GPU':>8} {'s/iter':>8} {'tok/s/GPU':>10} "
          f"{'TFLOP/s':>8} {'MFU':>6}")
    for i, q in enumerate(fitting[:args.top], 1):
        print(_row(i, q))
    best = fitting[0]

    # The config's own layout on these GPUs, for comparison (when it is one).
    try:
        own = evaluate(shape, Layout.from_config(_with_batch(cfg, gbs, args.gpus), args.gpus),
                       hw, f, G, limit)
        verdict = "fits" if own.fits else "does NOT fit"
        print(f"config's layout {own.layout.describe()}: {own.time.total:.3f} s/iter, "
              f"{own.memory.total / GIB:.1f} GiB/GPU ({verdict}); the best is "
              f"{own.time.total / best.time.total:.2f}x as fast "
              f"({100 * (1 - best.time.total / own.time.total):.0f} % less time per iteration)")
    except UserError as e:
        print(f"config's layout does not apply to {args.gpus} GPUs: {e}")
    if args.emit:
        text = overlay_yaml(best, [
            f"tools/plan_layout.py: best of {len(fitting)} fitting layouts for {args.config}",
            f"on {args.gpus} x {hw.name} ({G} per node): {best.layout.describe()}",
            f"predicted {best.time.total:.3f} s/iter, {best.memory.total / GIB:.1f} GiB/GPU, "
            f"MFU {best.time.mfu:.3f}",
            f"use: pretrain_gpt.py --config {args.config} --config {args.emit}"])
        atomic_write(args.emit, text)
        print(f"wrote {args.emit}")
    return 0


def _with_batch(cfg, global_batch, gpus):
    """``cfg`` with ``global_batch`` and validated for ``gpus`` ranks (a copy)."""
    from megatron.config import Config, finalize
    c = Config.from_dict(cfg.to_dict())
    c.training.global_batch_size = global_batch
    if c.training.train_iters is None and c.training.train_samples is None:
        c.training.train_iters = 1
    return finalize(c, gpus)


if __name__ == "__main__":
    sys.exit(main())
