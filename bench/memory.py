"""Per-rank parameter bytes and activation bytes saved for backward, by TP and recompute.

One fixed 8-layer GPT (fp32, dropout on) is built at TP=1, 2 and 4 (spawned
gloo processes on CPU; also TP>1 with sequence parallelism) and run forward
with recompute none, selective and full. Activation bytes are the tensor
storages a forward leaves alive for backward, followed by the storage tracker
the dry run uses (``megatron.dryrun.MemoryTracker``; parameters excluded: they
are counted as parameter bytes). Prints a table, then one line of key=value.

    python bench/memory.py [--layers 8 --hidden 256 --heads 8 --seq 256 --batch 2 --vocab 2048]
"""
import argparse
import platform
import time

import torch

from harness import run_ranks  # bench/harness.py: a script's own directory leads sys.path
from megatron import mpu
from megatron.config import Config
from megatron.dryrun import MemoryTracker
from megatron.model import GPTModel

MB = 2 ** 20
RECOMPUTE = ("none", "selective", "full")


def build_cfg(args, tp, sp, recompute):
    """The benchmark model's config at one layout."""
    cfg = Config()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads = args.layers, args.hidden, args.heads
    m.seq_length = args.seq
    m.hidden_dropout = m.attention_dropout = 0.1
    cfg.parallel.tensor_model_parallel_size = tp
    cfg.parallel.sequence_parallel = sp
    cfg.training.recompute = recompute
    return cfg


def saved_activation_bytes(model, ids, pos, labels):
    """Bytes of the tensor storages one forward leaves alive for backward (the project's
    one storage tracker, megatron.dryrun.MemoryTracker: each storage once, views
    included; the parameters were alive before), then run backward (so the graph is
    known to be whole)."""
    tracker = MemoryTracker()
    tracker.add_all(model.parameters())
    before = tracker.current
    with tracker:
        loss = model(ids, pos, labels).mean()
    held = tracker.current - before
    tracker.stop()
    loss.backward()
    return held


def measure(args, tp):
    """One rank's figures for every (sequence parallel, recompute) at this TP."""
    mpu.initialize_model_parallel(tp)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    labels = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    pos = torch.arange(args.seq).unsqueeze(0).expand(args.batch, args.seq)
    rows = []
    for sp in ((False, True) if tp > 1 else (False,)):
        for recompute in RECOMPUTE:
            mpu.model_parallel_seed(1234)
            # Random ids cover the whole (already aligned) vocabulary: nothing to mask.
            model = GPTModel(build_cfg(args, tp, sp, recompute), args.vocab, vocab_size=args.vocab)
            sharded = sum(p.numel() * p.element_size() for p in model.parameters()
                          if p.tensor_model_parallel)
            replicated = sum(p.numel() * p.element_size() for p in model.parameters()
                             if not p.tensor_model_parallel)
            start = time.perf_counter()
            act = saved_activation_bytes(model, ids, pos, labels)
            rows.append(dict(tp=tp, sp=sp, recompute=recompute, sharded=sharded,
                             replicated=replicated, activations=act,
                             seconds=time.perf_counter() - start))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2048, help="padded vocabulary (multiple of 128 x 4)")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    args = p.parse_args()

    print(f"# GPT {args.layers} layers, h={args.hidden}, heads={args.heads}, s={args.seq}, "
          f"b={args.batch}, vocab={args.vocab}, fp32, dropout 0.1")
    print(f"# {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    rows = []
    for tp in args.tp:
        rows += run_ranks(measure, tp, args, tp, timeout=1800)[0]  # rank 0 stands for all
    base = {r["recompute"]: r for r in rows if r["tp"] == 1} or \
        {r["recompute"]: r for r in rows if r["tp"] == args.tp[0] and not r["sp"]}
    print(f"{'TP':>3} {'SP':>3} {'recompute':>10} {'params MB':>10} {'sharded':>9} "
          f"{'replic.':>8} {'params/TP1':>10} {'activ. MB':>10} {'vs none':>8}")
    none_act = {(r["tp"], r["sp"]): r["activations"] for r in rows if r["recompute"] == "none"}
    base_params = base["none"]["sharded"] + base["none"]["replicated"]
    for r in rows:
        params = r["sharded"] + r["replicated"]
        print(f"{r['tp']:>3} {'on' if r['sp'] else '-':>3} {r['recompute']:>10} "
              f"{params / MB:>10.2f} {r['sharded'] / MB:>9.2f} {r['replicated'] / MB:>8.3f} "
              f"{params / base_params:>10.3f} {r['activations'] / MB:>10.1f} "
              f"{none_act[(r['tp'], r['sp'])] / r['activations']:>7.2f}x")
    figures = {}
    for r in rows:
        tag = f"tp{r['tp']}{'_sp' if r['sp'] else ''}_{r['recompute']}"
        if r["recompute"] == "none":
            figures[f"params_mb_tp{r['tp']}{'_sp' if r['sp'] else ''}"] = \
                round((r["sharded"] + r["replicated"]) / MB, 3)
        figures[f"act_mb_{tag}"] = round(r["activations"] / MB, 2)
    for (tp, sp), act in none_act.items():
        full = next(r for r in rows if (r["tp"], r["sp"], r["recompute"]) == (tp, sp, "full"))
        figures[f"full_recompute_cut_tp{tp}{'_sp' if sp else ''}"] = round(act / full["activations"], 2)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
