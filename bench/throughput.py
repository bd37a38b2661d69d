"""Training throughput of the framework against a hand-written GPT-2 or Llama, and MFU against a measured peak.

    python bench/throughput.py CONFIG [section.key=value ...] [--iters N] [--rounds R]
    python bench/throughput.py CONFIG --kernels      # time each fused op's paths instead

Builds the framework's real model, optimizer and schedule from CONFIG (as
pretrain_gpt.py does, with random tokens instead of data files), trains, and in
the same run times the hand-written baseline of the model's family on the same
shapes: bench/baseline_gpt2.py for GPT-2's block, bench/baseline_llama.py for the
Llama block (RoPE, RMSNorm, SwiGLU, no biases; any query groups, tied or not). The two are
interleaved (ours, baseline, ours, ...) and each figure is a median, because
machines that share cores drift during a run. The peak is measured in the same
run, also interleaved: a large fp32 GEMM on CPU, a bf16 GEMM on GPU (best of
each round). FLOPs are counted as in the Megatron-LM papers (megatron/planning/flops.py).

Last line: tokens_per_s=... mfu=... baseline_ratio=... ms_per_iter=... peak_gflops=...
"""
import argparse
import statistics
import sys
import time

import torch

import baseline_gpt2  # sibling scripts: a script's own directory leads sys.path
import baseline_llama
from megatron.planning.flops import model_flops_per_iteration
from megatron.planning.measure import measure_peak_gflops
from megatron.planning.measure import synchronize as _sync
from megatron.utils import DTYPES


def random_batches(micro_batch_size, seq_length, vocab_size, device, seed=0):
    """Endless micro batches of uniformly random tokens in the data loader's format."""
    g = torch.Generator().manual_seed(seed)
    position_ids = torch.arange(seq_length, device=device).unsqueeze(0).expand(micro_batch_size, -1)
    loss_mask = torch.ones(micro_batch_size, seq_length, device=device)
    while True:
        tokens = torch.randint(0, vocab_size, (micro_batch_size, seq_length + 1), generator=g).to(device)
        yield {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous(),
               "loss_mask": loss_mask, "position_ids": position_ids}


def forward_step(data_iterator, model):
    """pretrain_gpt.py's forward step: per-token loss, masked mean."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], labels=batch["labels"])
    mask = batch["loss_mask"]

    def loss_func(per_token_loss):
        loss = (per_token_loss.float() * mask).sum() / mask.sum()
        return loss, {"lm loss": loss.detach()}

    return output, loss_func


class FrameworkRunner:
    """The framework's model, optimizer and schedule, one optimizer step per call."""

    def __init__(self, cfg, device, vocab_size):
        from megatron.model.gpt_model import GPTModel
        from megatron.optimizer import get_megatron_optimizer
        from megatron.train_step import StepSchedule
        from megatron.training import build_model, build_scheduler
        self.cfg, self.device = cfg, device
        self.chunks = build_model(
            cfg, lambda pre_process, post_process: GPTModel(cfg, vocab_size, pre_process, post_process),
            device)
        self.optimizer = get_megatron_optimizer(cfg, self.chunks)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.schedule = StepSchedule.from_config(cfg)
        self.data = random_batches(cfg.training.micro_batch_size, cfg.model.seq_length, vocab_size, device)
        for c in self.chunks:
            c.train()

    def step(self):
        from megatron.train_step import train_step
        result = train_step(self.schedule, forward_step, self.data, self.chunks, self.optimizer,
                            self.scheduler)
        _sync(self.device)
        return result.loss_dicts


def baseline_family(m):
    """"gpt2" or "llama" when the model config ``m`` is one of the hand-written baselines'
    blocks, else None (a mix of options neither baseline writes)."""
    if (m.position_embedding_type, m.normalization, m.activation, m.add_bias_linear,
            m.untie_embeddings_and_output_weights, m.query_groups()) == \
            ("learned", "LayerNorm", "gelu_tanh", True, False, m.num_attention_heads) and \
            m.ffn_hidden_size in (None, 4 * m.hidden_size):
        return "gpt2"
    if (m.position_embedding_type, m.normalization, m.activation, m.add_bias_linear,
            m.rotary_percent, m.hidden_dropout, m.attention_dropout) == \
            ("rope", "RMSNorm", "swiglu", False, 1.0, 0.0, 0.0):
        return "llama"
    return None


class BaselineRunner:
    """The hand-written model of the config's family (``baseline_family``) on the same shapes,
    one optimizer step per call."""

    def __init__(self, cfg, device, vocab_size):
        m, t = cfg.model, cfg.training
        amp = DTYPES[t.precision] if t.precision != "fp32" else None
        common = dict(device=device, lr=cfg.optimizer.lr, weight_decay=cfg.optimizer.weight_decay)
        if baseline_family(m) == "llama":
            self.model, self.optimizer = baseline_llama.build(
                vocab_size, m.seq_length, m.num_layers, m.num_attention_heads, m.hidden_size,
                m.query_groups(), m.ffn_hidden_size or 4 * m.hidden_size, rope_base=m.rotary_base,
                eps=m.layernorm_epsilon, tie=not m.untie_embeddings_and_output_weights, **common)
        else:
            self.model, self.optimizer = baseline_gpt2.build(
                vocab_size, m.seq_length, m.num_layers, m.num_attention_heads, m.hidden_size,
                dropout=m.hidden_dropout, **common)
        self.amp, self.device = amp, device
        self.num_micro = t.global_batch_size // t.micro_batch_size
        self.data = random_batches(t.micro_batch_size, m.seq_length, vocab_size, device, seed=1)
        self.model.train()

    def step(self):
        # Gradient accumulation over the same number of micro batches as the framework does.
        for _ in range(self.num_micro - 1):
            b = next(self.data)
            loss = self.model(b["tokens"], b["labels"]) / self.num_micro
            loss.backward()
        b = next(self.data)
        if self.num_micro == 1:
            baseline_gpt2.train_step(self.model, self.optimizer, b["tokens"], b["labels"], self.amp)
        else:
            (self.model(b["tokens"], b["labels"]) / self.num_micro).backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        _sync(self.device)


def timed(fn, n, cpu_times=None):
    """Wall seconds of each of n calls; with ``cpu_times`` (a list), also append each call's
    process CPU seconds to it (all threads), a figure that other processes' load barely moves."""
    out = []
    for _ in range(n):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
        if cpu_times is not None:
            cpu_times.append(time.process_time() - c0)
    return out


def kernel_paths(cfg, device, repeats):
    """Time every fused op's paths (forward + backward) at the model's shapes; print a table."""
    from megatron import fused_kernels as fk
    from megatron.fused_kernels.bias_dropout_add import bias_dropout_add_train_compiled, bias_add_compiled
    m, t = cfg.model, cfg.training
    dtype = DTYPES[t.precision]
    s, b, h, heads = m.seq_length, t.micro_batch_size, m.hidden_size, m.num_attention_heads
    ffn = m.ffn_hidden_size or 4 * h

    def leaf(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    x4, b4 = leaf(s, b, ffn), leaf(ffn)
    x, bias, res = leaf(s, b, h), leaf(h), leaf(s, b, h)
    w, lb = leaf(h), leaf(h)
    q, k, v = leaf(b, heads, s, h // heads), leaf(b, heads, s, h // heads), leaf(b, heads, s, h // heads)
    p = m.hidden_dropout
    cases = {
        "bias_gelu": [("reference", lambda: fk.bias_gelu_reference(b4, x4)),
                      ("compiled", lambda: fk.bias_gelu_compiled(b4, x4)),
                      ("dispatch", lambda: fk.bias_gelu(b4, x4))],
        "bias_dropout_add": [("reference", lambda: fk.bias_dropout_add_reference(x, bias, res, p, True)),
                             ("compiled", (lambda: bias_dropout_add_train_compiled(x, bias, res, p)) if p > 0
                              else (lambda: bias_add_compiled(x, bias, res))),
                             ("dispatch", lambda: fk.bias_dropout_add(x, bias, res, p, True))],
        "layer_norm": [("reference", lambda: fk.layer_norm_reference(x, w, lb, 1e-5)),
                       ("dispatch", lambda: fk.layer_norm(x, w, lb, 1e-5))],
        "core_attention": [("reference", lambda: fk.core_attention_reference(q, k, v, 0.0, True)),
                           ("sdpa", lambda: fk.core_attention_sdpa(q, k, v, 0.0, True)),
                           ("dispatch", lambda: fk.core_attention(q, k, v, 0.0, True))],
    }
    if device.type == "cuda":
        from megatron.fused_kernels.triton_bias_gelu import bias_gelu_triton
        from megatron.fused_kernels.triton_layer_norm import layer_norm_triton
        cases["bias_gelu"].append(("triton", lambda: bias_gelu_triton(b4, x4)))
        cases["layer_norm"].append(("triton", lambda: layer_norm_triton(x, w, lb, 1e-5)))
    print(f"kernel paths, forward+backward, {dtype}, {device}, median of {repeats} "
          f"(s={s}, b={b}, h={h}, ffn={ffn}, heads={heads})")
    for name, paths in cases.items():
        fns, first = {}, {}
        for label, fn in paths:
            def run(fn=fn):
                out = fn()
                out.backward(torch.ones_like(out))
                _sync(device)
            first[label] = timed(run, 1)[0] * 1e3  # includes compiling, for the compiled paths
            timed(run, 2)
            fns[label] = run
        # Interleave paths within each repeat so drift hits them alike.
        times = {label: [] for label in fns}
        for _ in range(repeats):
            for label, run in fns.items():
                times[label] += timed(run, 1)
        med = {label: statistics.median(v) * 1e3 for label, v in times.items()}
        ref = med["reference"]
        print(f"  {name:17s} " + "  ".join(f"{label}={ms:.3f}ms (x{ref / ms:.2f})" for label, ms in med.items()))
        print(f"  {'':17s} first call: " + "  ".join(f"{label}={ms:.0f}ms" for label, ms in first.items()))


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="YAML config (the schema of megatron/config.py)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides")
    ap.add_argument("--iters", type=int, default=2, help="timed iterations per round and runner")
    ap.add_argument("--rounds", type=int, default=3, help="alternation rounds (ours, baseline, peak)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed iterations per runner first")
    ap.add_argument("--gemm-size", type=int, default=None,
                    help="side of the square peak GEMM (default 2048 on CPU, 8192 on GPU)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads on CPU (default: torch's choice, one per core)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the hand-written baseline")
    ap.add_argument("--kernels", action="store_true", help="time each fused op's paths instead")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from megatron.config import ConfigError, load_config
    from megatron.initialize import destroy_megatron, initialize_megatron, world_size_from_env
    from megatron.tokenizer import padded_vocab_size

    world = world_size_from_env()
    overrides = list(args.overrides)
    try:
        cfg = load_config(args.config, overrides, world_size=None)
        if cfg.training.train_iters is None and cfg.training.train_samples is None:
            cfg.training.train_iters = args.warmup + args.iters * args.rounds
        from megatron.config import finalize
        finalize(cfg, world)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m, t = cfg.model, cfg.training
    vocab = cfg.tokenizer.vocab_size
    if vocab is None:
        # e.g. configs/llama_tiny.yaml's GPT-2 BPE files: the tokens stay random, only the size counts
        from megatron.tokenizer import build_tokenizer
        try:
            vocab = build_tokenizer(cfg.tokenizer).vocab_size
        except Exception as e:
            print(f"error: the benchmark needs tokenizer.vocab_size or a tokenizer it can build ({e})",
                  file=sys.stderr)
            return 2
    vocab = padded_vocab_size(vocab, m.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size)
    device = initialize_megatron(cfg)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    def say(text):
        if rank0:
            print(text, flush=True)

    say(f"torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
           f", {torch.get_num_threads()} threads") + f", world size {world}, precision {t.precision}")
    if args.kernels:
        kernel_paths(cfg, device, max(5, args.rounds * args.iters))
        destroy_megatron()
        return 0

    ours = FrameworkRunner(cfg, device, vocab)
    n_params = sum(p.numel() for c in ours.chunks for p in c.parameters())
    baseline = None
    family = baseline_family(m)
    if not args.no_baseline:
        if world > 1:
            say("baseline skipped: it is a single-process model (run with one process to compare)")
        elif family is None:
            say("baseline skipped: the model mixes GPT-2 and Llama options; the hand-written "
                "baselines are GPT-2's block and Llama's (rope, RMSNorm, swiglu, no biases)")
        else:
            baseline = BaselineRunner(cfg, device, vocab)
    F = model_flops_per_iteration(m, t.global_batch_size, vocab, recompute=t.recompute == "full")
    tokens = t.global_batch_size * m.seq_length
    say(f"model: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads"
        f" ({m.query_groups()} query groups), seq {m.seq_length}, vocab {vocab}, block "
        f"{family or 'mixed'}, {n_params / 1e6:.1f} M parameters on rank 0; global batch "
        f"{t.global_batch_size} ({tokens} tokens), {F / 1e9:.1f} GFLOP per iteration")

    timed(ours.step, args.warmup)
    if baseline:
        timed(baseline.step, args.warmup)
    ours_t, base_t, peaks, ours_cpu, base_cpu, cpu_peaks = [], [], [], [], [], []
    for r in range(args.rounds):
        ours_t += timed(ours.step, args.iters, ours_cpu)
        if baseline:
            base_t += timed(baseline.step, args.iters, base_cpu)
        peak_wall, peak_cpu = measure_peak_gflops(device, n=args.gemm_size)
        peaks.append(peak_wall)
        cpu_peaks.append(peak_cpu)
        say(f"round {r + 1}/{args.rounds}: ours {statistics.median(ours_t[-args.iters:]) * 1e3:.0f} ms/iter"
            + (f", baseline {statistics.median(base_t[-args.iters:]) * 1e3:.0f} ms/iter" if baseline else "")
            + f", GEMM peak {peaks[-1]:.1f} GFLOP/s")

    ms = statistics.median(ours_t) * 1e3
    tokens_per_s = tokens / (ms / 1e3)
    peak = max(peaks)
    # Every rank holds 1/world of the work; MFU is per device against one device's peak.
    mfu = F / world / (ms / 1e3) / (peak * 1e9)
    ratio = float("nan")
    if baseline:
        base_ms = statistics.median(base_t) * 1e3
        ratio = base_ms / ms
        say(f"baseline: {base_ms:.0f} ms/iter, {tokens / (base_ms / 1e3):.0f} tokens/s, "
            f"MFU {F / (base_ms / 1e3) / (peak * 1e9):.3f}")
    if device.type == "cpu":
        # On a shared CPU the wall clock measures the neighbours as much as the code; process
        # CPU time (exact with --threads 1: no OpenMP spinning) measures the work itself.
        cpu_line = f"process CPU time per iteration ({torch.get_num_threads()} threads): ours " \
                   f"{statistics.median(ours_cpu) * 1e3:.0f} ms"
        if baseline:
            cpu_line += (f", baseline {statistics.median(base_cpu) * 1e3:.0f} ms, ratio "
                         f"{statistics.median(base_cpu) / statistics.median(ours_cpu):.3f}")
        cpu_mfu = F / statistics.median(ours_cpu) / (max(cpu_peaks) * 1e9)
        say(cpu_line + f"; CPU-time MFU {cpu_mfu:.3f} of {max(cpu_peaks):.1f} GFLOP per CPU-second")
    say(f"ours: {ms:.0f} ms/iter, {tokens_per_s:.0f} tokens/s, {F / world / (ms / 1e3) / 1e9:.1f} "
        f"GFLOP/s per device, MFU {mfu:.3f} of the measured peak {peak:.1f} GFLOP/s")
    say(f"tokens_per_s={tokens_per_s:.1f} mfu={mfu:.4f} baseline_ratio={ratio:.3f} "
        f"ms_per_iter={ms:.3f} peak_gflops={peak:.1f}")
    destroy_megatron()
    return 0


if __name__ == "__main__":
    sys.exit(main())
