"""The analytic memory model (megatron/planning/memory_model.py) against measured CPU runs.

Each layout trains a small GPT for real on CPU gloo ranks (the real model, DDP
grad buffer, optimizer and schedule; random tokens) and measures, on every
rank, the tensor bytes alive before a step plus the most the step allocates on
top (``megatron.planning.measure``: live storages, not RSS). The model predicts
the same from the layout alone. Prints one row per layout and pipeline rank,
then one line of key=value: ``max_error_pct=... within_10=1``.

    python bench/memory_model.py [--layers 4 --hidden 128 --heads 4 --seq 128 --batch 2]
"""
import argparse
import platform
import time

import torch

from harness import run_ranks  # bench/harness.py: a script's own directory leads sys.path
from megatron.planning.validation import LAYOUTS, measure_layouts, predicted_rows

MB = 2 ** 20


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2, help="micro batch size")
    p.add_argument("--vocab", type=int, default=1024)
    args = p.parse_args()
    model = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                 seq_length=args.seq, micro_batch_size=args.batch, vocab_size=args.vocab)
    print(f"# GPT {args.layers} layers, h={args.hidden}, heads={args.heads}, s={args.seq}, "
          f"micro batch {args.batch}, vocab {args.vocab}, dropout 0.1, CPU gloo")
    print(f"# {platform.platform()}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    start = time.perf_counter()
    measured = {}
    for world in sorted({spec["world"] for spec in LAYOUTS}):
        specs = [s for s in LAYOUTS if s["world"] == world]
        for rank_rows in run_ranks(measure_layouts, world, specs, model, timeout=1800):
            for row in rank_rows:
                key = (row["name"], row["pipeline_rank"])
                # Ranks of one pipeline stage differ only by DP padding: keep the largest.
                if key not in measured or row["peak"] > measured[key]["peak"]:
                    measured[key] = row
    rows = predicted_rows(measured, model)
    # static: what lives between steps; step: what one step adds on top at its peak.
    print(f"{'layout':<26} {'pp':>2} {'static MB':>9} {'step pred.':>10} {'step meas.':>10} "
          f"{'peak pred.':>10} {'peak meas.':>10} {'error':>6}  peak moment")
    for r in rows:
        print(f"{r['name']:<26} {r['pipeline_rank']:>2} {r['static'] / MB:>9.2f} "
              f"{(r['predicted'] - r['predicted_static']) / MB:>10.2f} {r['step_peak'] / MB:>10.2f} "
              f"{r['predicted'] / MB:>10.2f} {r['peak'] / MB:>10.2f} {r['error_pct']:>5.1f}%  "
              f"{r['detail']}")
    worst = max(abs(r["error_pct"]) for r in rows)
    act = max(abs(r["step_error_pct"]) for r in rows)
    print(f"# {len({r['name'] for r in rows})} layouts in {time.perf_counter() - start:.0f} s")
    print(f"layouts={len({r['name'] for r in rows})} max_error_pct={worst:.1f} "
          f"max_step_error_pct={act:.1f} within_10={int(worst <= 10)}")


if __name__ == "__main__":
    main()
