"""The dry run as a command line: ``tools/dry_run.py`` and ``pretrain_gpt.py --dry-run``.

``add_arguments(parser)`` declares the flags both share; ``run(cfg, args, ...)`` dry-runs
the asked rank (or every distinct role), prints each report and a summary line per role,
writes ``--json`` if asked, and ends with one ``key=value`` line. Importing it imports
no torch (argument errors come back fast).
"""
import copy
import json
import time

from megatron.dryrun.report import GIB


def add_arguments(parser, world_size_default=1):
    """``--world-size``, ``--rank``, ``--target``, ``--vocab-size``, ``--json``,
    ``--all-microbatches``."""
    parser.add_argument("--world-size", type=int, default=world_size_default,
                        help=f"ranks of the job to dry-run (default {world_size_default})")
    parser.add_argument("--rank", type=int, default=None,
                        help="the global rank to dry-run (default: one rank per distinct "
                             "role: first / middle / last stage x DP rank 0 or not)")
    parser.add_argument("--target", choices=["cuda", "cpu"], default=None,
                        help="whose kernels count: cuda (default unless training.device=cpu) "
                             "or cpu")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="the tokenizer's vocabulary size, when its files are not at hand "
                             "(GPT-2 BPE is known: 50257)")
    parser.add_argument("--json", default=None, help="also write the reports to this JSON file")
    parser.add_argument("--all-microbatches", action="store_true",
                        help="simulate every micro batch of the step (default: as many as "
                             "determine the memory peak, FLOPs and collectives extrapolated)")


def _simulated(report):
    m = report.layout["num_microbatches"]
    k = report.simulated_microbatches
    return f" (simulated {k} of {m} micro batches; counts extrapolated)" if 0 < k < m else ""


def run(cfg, args, model_provider=None, forward_step_func=None, vocab_size=None):
    """Dry-run ``args.rank`` (or every distinct role) of ``cfg``; print; return the reports."""
    from megatron.config import ConfigError, finalize
    from megatron.dryrun.run import distinct_roles, dry_run
    world = args.world_size
    if world < 1:
        raise ConfigError(f"--world-size={world} must be at least 1")
    vocab_size = args.vocab_size or vocab_size
    start = time.perf_counter()
    if args.rank is not None:
        ranks = [args.rank]
    else:
        ranks = [r for r, _ in distinct_roles(finalize(copy.deepcopy(cfg), world), world)]
    reports = []
    for rank in ranks:
        report = dry_run(cfg, world, rank, model_provider=model_provider,
                         forward_step_func=forward_step_func, vocab_size=vocab_size,
                         target=args.target,
                         all_microbatches=getattr(args, "all_microbatches", False))
        print("\n".join(report.format()), flush=True)
        reports.append(report)
    seconds = time.perf_counter() - start
    print(f"dry run of {world} ranks, {len(reports)} role(s), {seconds:.1f} s:")
    for r in reports:
        print(f"  rank {r.rank:>5} ({r.role}): peak {r.peak_bytes / GIB:.2f} GiB "
              f"(first step {r.first_step_peak_bytes / GIB:.2f}), "
              f"{r.num_parameters / 1e6:.1f} M parameters, {r.flops / 1e12:.2f} TFLOPs per step"
              f"{_simulated(r)}")
    if args.json:
        from megatron.checkpoint.files import atomic_write
        atomic_write(args.json, json.dumps([r.to_dict() for r in reports], indent=1) + "\n")
    worst = max(reports, key=lambda r: r.peak_bytes)
    print(f"max_peak_gib={worst.peak_bytes / GIB:.3f} max_peak_rank={worst.rank} "
          f"roles={len(reports)} seconds={seconds:.1f}")
    return reports
