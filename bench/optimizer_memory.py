"""Optimizer-state bytes per rank vs data-parallel size, plain vs distributed optimizer.

Builds the same small GPT (bf16 params, fp32 masters) on DP = 1, 2, 4 CPU gloo
ranks, takes one optimizer step on synthetic gradients (Adam state is created
on the first step) and counts, on rank 0: the Adam moments and the fp32 master
copies the optimizer holds, and the DDP grad buffer. With the distributed
optimizer the first two fall as 1/DP.

    python bench/optimizer_memory.py [--precision bf16] [--layers 4] [--hidden 256]

Ends with one line of key=value figures (bytes per rank).
"""
import argparse

import torch


def _measure(precision, layers, hidden, vocab):
    from megatron import mpu
    from megatron.config import Config
    from megatron.model.gpt_model import GPTModel
    from megatron.mpu.distributed import DistributedDataParallel, finalize_model_grads
    from megatron.mpu.random import model_parallel_seed
    from megatron.optimizer import get_megatron_optimizer
    from megatron.utils import DTYPES

    mpu.initialize_model_parallel(1, 1)
    out = {}
    dtype = DTYPES[precision]
    for distributed in (False, True):
        cfg = Config()
        cfg.model.num_layers, cfg.model.hidden_size = layers, hidden
        cfg.model.num_attention_heads, cfg.model.seq_length = 4, 64
        cfg.training.precision = precision
        cfg.parallel.distributed_optimizer = distributed
        model_parallel_seed(1234)
        model = DistributedDataParallel(GPTModel(cfg, vocab).to(dtype),
                                        use_distributed_optimizer=distributed)
        opt = get_megatron_optimizer(cfg, [model])
        opt.zero_grad()
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.main_grad.copy_(torch.randn(p.shape, generator=g) * 1e-3)
        finalize_model_grads([model])
        ok, _, _ = opt.step()
        assert ok
        model_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        adam = sum(t.numel() * t.element_size() for s in opt.optimizer.state.values()
                   for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        masters = sum(p.numel() * p.element_size() for grp in opt.param_groups
                      for p in grp["params"]
                      if p.untyped_storage().data_ptr() not in model_storages)
        grad_buffer = sum(b.data.numel() * b.data.element_size() for b in model.buffers_)
        params = sum(p.numel() for p in model.parameters())
        out["distributed" if distributed else "plain"] = dict(
            adam=adam, masters=masters, grad_buffer=grad_buffer, params=params)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    from harness import run_ranks

    print(f"torch {torch.__version__}, CPU gloo, precision {args.precision}, "
          f"GPT {args.layers} layers x hidden {args.hidden}, vocab {args.vocab}")
    print(f"{'DP':>3} {'optimizer':>12} {'params':>10} {'adam MB':>9} {'masters MB':>11} "
          f"{'opt total MB':>13} {'grad buf MB':>12}")
    figures = {}
    for dp in args.dp:
        res = run_ranks(_measure, dp, args.precision, args.layers, args.hidden,
                              args.vocab)[0]
        for kind, r in res.items():
            total = r["adam"] + r["masters"]
            print(f"{dp:>3} {kind:>12} {r['params']:>10} {r['adam'] / 2**20:>9.3f} "
                  f"{r['masters'] / 2**20:>11.3f} {total / 2**20:>13.3f} "
                  f"{r['grad_buffer'] / 2**20:>12.3f}")
            figures[f"{kind}_opt_state_bytes_dp{dp}"] = total
    base = figures.get(f"distributed_opt_state_bytes_dp{args.dp[0]}")
    for dp in args.dp[1:]:
        figures[f"distributed_ratio_dp{dp}"] = round(
            figures[f"distributed_opt_state_bytes_dp{dp}"] / base, 4)
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
