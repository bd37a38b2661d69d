"""Time torch's AdamW implementations on one device: the choice megatron/optimizer makes.

    python bench/adamw.py [--layers 6 --hidden 384 --vocab 8192 --seq 256] [--repeats 15]

The parameters have the shapes of a GPT-2 with those sizes (configs/bench_cpu.yaml by
default: 13.9 M parameters in 76 tensors). Each implementation steps its own copy;
they are interleaved step by step so drift hits them alike, and each figure is a
median. Last line: ``fused_ms=... foreach_ms=... single_ms=... params_m=...``.
"""
import argparse
import statistics
import time

import torch


def gpt_shapes(layers, hidden, vocab, seq):
    """Parameter shapes of a GPT-2 (tied output layer), in model order."""
    h, ffn = hidden, 4 * hidden
    layer = [(h,), (h,), (3 * h, h), (3 * h,), (h, h), (h,), (h,), (h,), (ffn, h), (ffn,), (h, ffn), (h,)]
    return [(vocab, h), (seq, h)] + layer * layers + [(h,), (h,)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shapes = gpt_shapes(args.layers, args.hidden, args.vocab, args.seq)
    kinds = {"fused": dict(fused=True), "foreach": dict(foreach=True), "single": dict(foreach=False)}
    optimizers = {}
    for name, kw in kinds.items():
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device)) for s in shapes]
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(device)
        try:
            optimizers[name] = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **kw)
            optimizers[name].step()  # allocates the state
        except RuntimeError as e:  # e.g. no fused AdamW for this device in this torch
            print(f"{name}: unavailable ({str(e).splitlines()[0]})")
            optimizers.pop(name, None)
    times = {name: [] for name in optimizers}
    for _ in range(args.repeats):
        for name, opt in optimizers.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
          f"{n_params / 1e6:.1f} M parameters in {len(shapes)} tensors, median of {args.repeats}")
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    for name, ms in med.items():
        print(f"  AdamW {name:8s} {ms:8.1f} ms per step")
    print(" ".join(f"{name}_ms={ms:.1f}" for name, ms in med.items()) + f" params_m={n_params / 1e6:.2f}")


if __name__ == "__main__":
    main()
