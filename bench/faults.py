"""The failure campaign's long form: kill-anywhere on one process and under torchrun, a hung rank.

    python bench/faults.py [--single-kills 20] [--torchrun-kills 4] [--tp 2] [--hung-minutes 1]

1. One process on the quickstart's corpus (a small GPT, checkpoints every few iterations)
   SIGKILLed at ``--single-kills`` random moments (``--single-mid-saves`` of them while a
   checkpoint is written), started again after each; then its final checkpoint and every
   logged loss are compared with the uninterrupted run's, bit for bit.
2. The same under ``torchrun --standalone --nproc_per_node=TP --max-restarts=K`` at
   tensor-parallel size ``--tp``: K = ``--torchrun-kills`` workers SIGKILLed (the first
   before the first checkpoint); the agent restarts the group each time, and the
   rendezvous rounds in its log must be K + 1.
3. One of two ranks SIGSTOPped mid-training with
   ``training.distributed_timeout_minutes=--hung-minutes``: how long until the other
   fails with its one-line error, and until torchrun ends (0 skips this part).

The kill and compare machinery is bench/kill_runs.py (tests/test_faults.py runs the short
form). Last line: kills=... mid_save=... restart_rounds=... identical=1|0 (both runs bit for
bit); the exit code is 1 when anything failed (also too many rounds, or no timeout error).
"""
import argparse
import os
import random
import re
import signal
import sys
import tempfile
import time

import kill_runs  # a script's own directory leads sys.path

DATA = os.path.join(kill_runs.ROOT, "data")


def overrides(save, iters, save_interval, **extra):
    """A small GPT on the quickstart's KJV corpus (preprocessed on first use), every
    iteration logged, resuming from its own save directory."""
    base = {
        "model.num_layers": 2, "model.hidden_size": 64, "model.num_attention_heads": 4,
        "model.seq_length": 64, "model.hidden_dropout": 0.1, "model.attention_dropout": 0.1,
        "tokenizer.type": "GPT2BPETokenizer",
        "tokenizer.vocab_file": os.path.join(DATA, "kjv-vocab.json"),
        "tokenizer.merge_file": os.path.join(DATA, "kjv-merges.txt"),
        "data.data_path": f"[{os.path.join(DATA, 'kjv_text_document')}]",
        "data.preprocess_input": os.path.join(DATA, "kjv.jsonl.gz"), "data.split": "969,30,1",
        "training.micro_batch_size": 4, "training.global_batch_size": 8,
        "training.train_iters": iters, "training.eval_interval": 2 * save_interval,
        "training.eval_iters": 1, "training.device": "cpu", "training.seed": 1234,
        "optimizer.lr": 3e-3, "optimizer.lr_warmup_iters": 2, "logging.log_interval": 1,
        "checkpoint.save": save, "checkpoint.load": save, "checkpoint.save_interval": save_interval,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def campaign(name, work, args, rng, nproc, kills, mid_saves, **extra):
    """Reference run, killed run, comparison; prints one line and returns the result."""
    slug = re.sub(r"\W+", "_", name)
    ref_save, save = os.path.join(work, f"{slug}_reference"), os.path.join(work, slug)
    t0 = time.monotonic()
    text, timing = kill_runs.reference(overrides(ref_save, args.iters, args.save_interval, **extra),
                                       nproc)
    plan = kill_runs.make_plan(rng, kills, mid_saves, nproc, first_before=args.save_interval)
    t1 = time.monotonic()
    result = kill_runs.run_with_kills(overrides(save, args.iters, args.save_interval, **extra),
                                      plan, timing, rng, save, args.save_interval, nproc,
                                      timeout=args.timeout)
    t2 = time.monotonic()
    diff = (kill_runs.compare(text, ref_save, result["text"], save) if result["code"] == 0
            else [f"exit code {result['code']}"])
    if diff and result["code"] != 0:
        print(result["text"][-4000:], flush=True)
    kinds = {k: sum(m["kind"] == k for m in result["kills"]) for k in ("startup", "train", "save")}
    mid = sum(m["mid_save"] for m in result["kills"])
    print(f"{name}: {len(result['kills'])} kills ({kinds['startup']} at startup, {kinds['train']} "
          f"while training, {kinds['save']} aimed at a save: {mid} mid-save), rounds "
          f"{result['rounds']}, identical {not diff}{'' if not diff else ': ' + '; '.join(diff[:5])}; "
          f"reference {t1 - t0:.0f} s (startup {timing['startup']:.1f} s, "
          f"{timing['iteration'] * 1e3:.0f} ms/iteration), killed run {t2 - t1:.0f} s", flush=True)
    return result, mid, not diff


def hung(args):
    """SIGSTOP rank 1 of 2 mid-training: seconds until rank 0's one-line error, until
    torchrun ends, its exit code and that line."""
    launch = kill_runs.Launch(overrides(None, 10**6, 1, **{
        "checkpoint.save": "null", "checkpoint.load": "null", "checkpoint.save_interval": "null",
        "training.eval_iters": 0, "training.distributed_timeout_minutes": args.hung_minutes}),
        nproc=2).start()
    deadline = time.monotonic() + 600
    try:
        if launch.out.wait_for(kill_runs.ITERATION, 0, deadline) is None:
            raise RuntimeError("the hung-rank run did not start:\n" + launch.out.text()[-3000:])
        os.kill(launch.workers()[1], signal.SIGSTOP)
        t0 = time.monotonic()
        found = launch.out.wait_for(re.compile(r"error: .*timed out"), 0, deadline)
        failed = time.monotonic() - t0
        code = launch.wait(deadline)
        ended = time.monotonic() - t0
    finally:
        if launch.proc.poll() is None:
            os.killpg(launch.proc.pid, signal.SIGKILL)
    line = found[1].string if found else "(no error line)"
    return failed, ended, code, line


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--single-kills", type=int, default=20)
    ap.add_argument("--single-mid-saves", type=int, default=5)
    ap.add_argument("--torchrun-kills", type=int, default=4)
    ap.add_argument("--torchrun-mid-saves", type=int, default=2)
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel size = processes")
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--save-interval", type=int, default=3)
    ap.add_argument("--hung-minutes", type=float, default=1.0, help="0 skips the hung rank")
    ap.add_argument("--seed", type=int, default=None, help="of the kill plans (default: random)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per killed run")
    ap.add_argument("--workdir", default=None, help="default: a temporary directory")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    print(f"faults: seed {seed}, {args.iters} iterations, a checkpoint every "
          f"{args.save_interval}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        single, single_mid, single_ok = campaign(
            "one process", work, args, rng, 1, args.single_kills, args.single_mid_saves)
        multi, multi_mid, multi_ok = campaign(
            f"torchrun TP={args.tp}", work, args, rng, args.tp, args.torchrun_kills,
            args.torchrun_mid_saves, **{"parallel.tensor_model_parallel_size": args.tp})
        identical = single_ok and multi_ok
        ok = identical and multi["rounds"] == len(multi["kills"]) + 1
        if args.hung_minutes > 0:
            failed, ended, code, line = hung(args)
            print(f"hung rank ({args.hung_minutes:g} min timeout): rank 0 failed after "
                  f"{failed:.1f} s, torchrun ended after {ended:.1f} s with exit code {code}: "
                  f"{line}", flush=True)
            ok = ok and "timed out" in line and code not in (0, None)
    kills = len(single["kills"]) + len(multi["kills"])
    rounds = multi["rounds"] - 1 if multi["rounds"] else 0
    print(f"kills={kills} mid_save={single_mid + multi_mid} restart_rounds={rounds} "
          f"identical={int(identical)}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
