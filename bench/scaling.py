"""The Megatron-LM paper's weak scaling (Figure 5) predicted by the time model, point by point.

Calibrates one number, the fraction of the V100's peak that the paper's
single-GPU baseline sustains (1.2B parameters, 39 TFLOP/s), then predicts the
per-GPU throughput of the 2.5B, 4.2B and 8.3B models on 2, 4 and 8 GPUs of
tensor parallelism, and of all four with 64-way data parallelism on top (64 to
512 GPUs), as a percentage of the baseline, beside the paper's. Nothing runs on
a GPU: this is megatron/planning/time_model.py with the V100-32GB profile.
Last line: ``max_abs_error_points=... within_8=... points_within_8=.../8``.

    python bench/scaling.py [--hardware V100-32GB]
"""
import argparse

from megatron.planning.hardware import get_profile
from megatron.planning.paper import BASELINE_FLOPS, predicted_scaling
from megatron.planning.time_model import calibrated_efficiency


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hardware", default="V100-32GB")
    args = p.parse_args()
    hw = get_profile(args.hardware)
    f = calibrated_efficiency()
    print(f"# {hw.name}: {hw.peak('fp16') / 1e12:.0f} TFLOP/s fp16 peak, "
          f"NVLink {hw.intra_node_bandwidth / 1e9:.0f} GB/s, network "
          f"{hw.inter_node_bandwidth / 1e9:.0f} GB/s per {hw.gpus_per_node}-GPU node")
    print(f"# calibrated: compute at {f:.3f} of peak makes the 1.2B baseline "
          f"{BASELINE_FLOPS / 1e12:.0f} TFLOP/s")
    print(f"{'model':>5} {'GPUs':>5} {'TP':>3} {'DP':>3} {'step s':>7} {'TFLOP/s':>8} "
          f"{'TP comm':>8} {'DP comm':>8} {'predicted':>10} {'paper':>6} {'diff':>6}")
    rows = predicted_scaling(hw, f)
    for r in rows:
        t = r["time"]
        print(f"{r['model']:>5} {r['gpus']:>5} {r['tp']:>3} {r['dp']:>3} {t.total:>7.3f} "
              f"{r['flops_per_gpu'] / 1e12:>8.1f} {t.tp_comm:>8.3f} {t.dp_comm:>8.3f} "
              f"{r['predicted']:>9.1f}% {r['paper']:>5.0f}% {r['predicted'] - r['paper']:>+6.1f}")
    errors = [abs(r["predicted"] - r["paper"]) for r in rows]
    within = sum(e <= 8 for e in errors)
    print(f"max_abs_error_points={max(errors):.1f} within_8={int(within == len(rows))} "
          f"points_within_8={within}/{len(rows)} compute_efficiency={f:.3f}")


if __name__ == "__main__":
    main()
