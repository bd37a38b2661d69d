"""The dry run measured: predicted vs real peak tensor memory, and the paper's models at 512 ranks.

--validate: the layouts of megatron/dryrun/validate.py run for real on 4 spawned CPU gloo
ranks (two steps each, under the storage tracker), and the dry run of each rank's
stage; prints per layout and stage the predicted and measured peaks (first step and
every later step) and their error.

--paper: the dry run of every distinct role of each of the paper's configs at
--world-size ranks (default 512), each config in a fresh process; prints one line per
role (layout, parameters, memory, FLOPs) and each config's dry-run time. At 512 ranks
the configs' global batch of 512 does not divide over the data-parallel ranks of the
smaller models (the dry run says so, as a launch would): --weak-scaling (default) uses
the paper's weak-scaling batch instead, 8 sequences per model replica.

    python bench/dry_run.py [--validate] [--paper] [--world-size 512] [--recompute none]

Ends with one key=value line.
"""
import argparse
import concurrent.futures
import multiprocessing
import os
import platform
import time

import torch

from harness import run_ranks  # bench/harness.py: a script's own directory leads sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = ["gpt2_345m", "gpt2_1.2b", "gpt2_2.5b", "gpt2_4.2b", "gpt2_8.3b"]
MIB, GIB = 2 ** 20, 2 ** 30


def validate():
    """Rows (layout, stage, predicted / measured peaks) and the largest error."""
    from megatron.dryrun.validate import (LAYOUTS, WORLD_SIZE, measure_then_predict,
                                          relative_error)
    results = run_ranks(measure_then_predict, WORLD_SIZE, list(LAYOUTS))
    predicted = {}
    for _, by_rank in results:
        predicted.update(by_rank)
    print(f"{'layout':<22} {'rank':>4} {'role':<28} {'first step: pred':>16} {'meas':>8} "
          f"{'err':>6} {'later steps: pred':>17} {'meas':>8} {'err':>6}")
    worst = 0.0
    for name in LAYOUTS:
        stages = {(p["pipeline_model_parallel_rank"], p["data_parallel_rank"] > 0): p
                  for (n, _), p in predicted.items() if n == name}
        for rank, (measured, _) in enumerate(results):
            m = measured[name]
            p = stages[(m["pipeline_model_parallel_rank"], m["data_parallel_rank"] > 0)]
            e1 = relative_error(p["first_step_peak_bytes"], m["first_step_peak_bytes"])
            e2 = relative_error(p["peak_bytes"], m["peak_bytes"])
            worst = max(worst, abs(e1), abs(e2))
            print(f"{name:<22} {rank:>4} {m['role']:<28} "
                  f"{p['first_step_peak_bytes'] / MIB:>13.3f} MiB {m['first_step_peak_bytes'] / MIB:>8.3f} "
                  f"{e1:>+6.1%} {p['peak_bytes'] / MIB:>14.3f} MiB {m['peak_bytes'] / MIB:>8.3f} "
                  f"{e2:>+6.1%}")
    return worst


def _paper_config(name, world_size, weak_scaling, recompute):
    """Dry-run every distinct role of configs/<name>.yaml; (reports as dicts, seconds)."""
    from megatron.config import load_config
    from megatron.dryrun import dry_run_roles
    overrides = [f"training.recompute={recompute}"] if recompute else []
    if weak_scaling:
        overrides.append("training.global_batch_size=null")  # micro batch x DP
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.yaml"), overrides)
    start = time.perf_counter()
    reports = dry_run_roles(cfg, world_size)
    return [r.to_dict() for r in reports], time.perf_counter() - start


def paper(world_size, weak_scaling, recompute):
    """One line per role of each paper config; {config: seconds}."""
    ctx = multiprocessing.get_context("spawn")
    seconds = {}
    print(f"{'config':<10} {'layout':<24} {'role':<28} {'params':>8} {'state':>9} "
          f"{'activ.':>9} {'peak':>9} {'1st step':>9} {'TFLOPs':>7} {'in flight':>9}")
    for name in PAPER:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            start = time.perf_counter()
            reports, _ = pool.submit(_paper_config, name, world_size, weak_scaling,
                                     recompute).result()
            seconds[name] = time.perf_counter() - start  # process start included
        for r in reports:
            lay = r["layout"]
            layout = (f"TP{lay['tp']} PP{lay['pp']} DP{lay['dp']} mb{lay['micro_batch_size']}"
                      f"x{lay['num_microbatches']} {lay['recompute']}")
            state = sum(r[k] for k in ("parameter_bytes", "gradient_bytes",
                                       "master_weight_bytes", "optimizer_state_bytes"))
            print(f"{name:<10} {layout:<24} {r['role']:<28} {r['num_parameters'] / 1e9:>7.3f}B "
                  f"{state / GIB:>5.2f} GiB {r['activation_peak_bytes'] / GIB:>5.2f} GiB "
                  f"{r['peak_bytes'] / GIB:>5.2f} GiB {r['first_step_peak_bytes'] / GIB:>5.2f} GiB "
                  f"{r['flops'] / 1e12:>7.2f} {r['in_flight_microbatches']:>9}")
        print(f"{name:<10} dry run of {len(reports)} role(s) at {world_size} ranks: "
              f"{seconds[name]:.1f} s (fresh process)", flush=True)
    return seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--validate", action="store_true")
    p.add_argument("--paper", action="store_true")
    p.add_argument("--world-size", type=int, default=512)
    p.add_argument("--no-weak-scaling", dest="weak_scaling", action="store_false")
    p.add_argument("--recompute", default=None, help="override training.recompute")
    args = p.parse_args()
    if not (args.validate or args.paper):
        args.validate = args.paper = True
    print(f"# {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    figures = {}
    if args.validate:
        figures["max_memory_error"] = round(validate(), 4)
    if args.paper:
        seconds = paper(args.world_size, args.weak_scaling, args.recompute)
        figures.update({f"seconds_{k}": round(v, 1) for k, v in seconds.items()})
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
