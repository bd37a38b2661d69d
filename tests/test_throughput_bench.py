"""Smoke test of bench/throughput.py on a tiny model: it runs end to end and its figures are consistent."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from flops import gpt_flops_per_iteration, paper_closed_form  # noqa: E402


def test_flops_formula_matches_paper_closed_form():
    for args in [(8, 256, 6, 384, 8192), (512, 2048, 24, 2048, 50304), (3, 17, 1, 64, 100)]:
        for rc in (False, True):
            ours, paper = gpt_flops_per_iteration(*args, recompute=rc), paper_closed_form(*args, recompute=rc)
            assert abs(ours - paper) <= 1e-9 * paper
    # A non-default FFN width changes the count (the closed form assumes 4h).
    assert gpt_flops_per_iteration(1, 8, 1, 16, 32, ffn_hidden_size=32) < gpt_flops_per_iteration(1, 8, 1, 16, 32)


def _run(args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, os.path.join(ROOT, "bench", "throughput.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_throughput_tiny_run_prints_consistent_figures():
    proc = _run([os.path.join(ROOT, "configs", "bench_cpu.yaml"), "model.num_layers=2", "model.hidden_size=64",
                 "model.num_attention_heads=2", "model.seq_length=32", "tokenizer.vocab_size=256",
                 "training.micro_batch_size=2", "--iters", "1", "--rounds", "2", "--gemm-size", "256"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    figures = dict(kv.split("=") for kv in last.split())
    assert list(figures) == ["tokens_per_s", "mfu", "baseline_ratio", "ms_per_iter", "peak_gflops"]
    f = {k: float(v) for k, v in figures.items()}
    assert all(v > 0 for v in f.values()), last
    # tokens/s and ms/iter describe the same median: 2 sequences x 32 tokens per iteration.
    assert abs(f["tokens_per_s"] * f["ms_per_iter"] / 1e3 - 64) < 0.5
    flops = gpt_flops_per_iteration(2, 32, 2, 64, 256)
    expected_mfu = flops / (f["ms_per_iter"] / 1e3) / (f["peak_gflops"] * 1e9)
    assert abs(f["mfu"] - expected_mfu) <= 0.002 + 0.01 * expected_mfu


def test_throughput_bad_config_is_one_line():
    proc = _run([os.path.join(ROOT, "configs", "no_such.yaml")])
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no_such.yaml" in proc.stderr


def test_adamw_bench_times_every_kind_on_the_models_parameter_shapes():
    import baseline_gpt2
    from adamw import gpt_shapes
    # The shapes are a GPT-2's: the hand-written model's parameters, in count and size.
    model = baseline_gpt2.GPT(64, 8, 2, 2, 16)
    assert sorted(gpt_shapes(2, 16, 64, 8)) == sorted(tuple(p.shape) for p in model.parameters())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "adamw.py"), "--layers", "2",
                           "--hidden", "16", "--vocab", "64", "--seq", "8", "--repeats", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = dict(kv.split("=") for kv in proc.stdout.strip().splitlines()[-1].split())
    assert list(figures) == ["fused_ms", "foreach_ms", "single_ms", "params_m"]
    assert all(float(figures[k]) > 0 for k in ("fused_ms", "foreach_ms", "single_ms"))
    assert float(figures["params_m"]) == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
