"""The planner's analytic memory model against the dry run, at realistic width.

Layouts of GPT-2 345M and Llama 2 7B with a few layers on 8 to 64 ranks
(``megatron/planning/crosscheck.py``); for the first, a middle and the last pipeline
stage: static bytes, the schedule's activation peak and the total peak, model vs the
dry run (``--target cuda``; the model's ``dry-run`` kernels, its Triton ``cuda``
figures beside). Prints a Markdown table, then one line of key=value:
``max_activation_error_pct=... max_peak_error_pct=... within_10=1``.

    python bench/plan_vs_dry_run.py
"""
import platform
import time

import torch

from megatron.planning.crosscheck import CASES, compare, markdown_table


def main():
    print(f"# {platform.platform()}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    start = time.perf_counter()
    rows = []
    for case in CASES:
        rows += compare(*case)
    print(markdown_table(rows))
    act = max(abs(r["error_pct"]["activations"]) for r in rows)
    peak = max(abs(r["error_pct"]["peak"]) for r in rows)
    static = max(abs(r["error_pct"]["static"]) for r in rows)
    print(f"# {len(CASES)} layouts, {len(rows)} stages dry-run in "
          f"{time.perf_counter() - start:.0f} s")
    print(f"layouts={len(CASES)} stages={len(rows)} max_static_error_pct={static:.4f} "
          f"max_activation_error_pct={act:.1f} max_peak_error_pct={peak:.1f} "
          f"within_10={int(max(act, peak) <= 10)}")


if __name__ == "__main__":
    main()
