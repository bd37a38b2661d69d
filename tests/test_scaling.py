"""The time model and hardware profiles: the paper's weak scaling (Figure 5) point by point.

docs/scaling.md records the comparison: one calibrated number (the 1.2B single-GPU
baseline, 39 TFLOP/s) and every point within 8 efficiency points of the paper's,
except 2.5B on 128 GPUs (data parallelism costs the paper 12 points there but only
3 at 4.2B and 8.3B, which move more gradient bytes per second: no bandwidth model
gives both; docs/scaling.md). This test keeps those statements true.
"""
import os
import subprocess
import sys

import pytest

from megatron.planning.hardware import HardwareError, get_profile, load_profiles
from megatron.planning.layout import Layout
from megatron.planning.paper import BASELINE_FLOPS, paper_layout, paper_shape, predicted_scaling
from megatron.planning.time_model import calibrated_efficiency, step_time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOWN_MISS = ("2.5B", 128)


def test_profiles_name_a_source_for_every_number():
    profiles = load_profiles()
    assert {"V100-32GB", "A100-80GB", "H100-80GB", "H200"} <= set(profiles)
    for hw in profiles.values():
        for key in ("peak_flops", "memory_bytes", "memory_bandwidth", "intra_node_bandwidth",
                    "inter_node_bandwidth", "gpus_per_node"):
            assert hw.sources.get(key), (hw.name, key)
    assert get_profile("h100-80gb").peak("bf16") == 989e12
    with pytest.raises(HardwareError, match="no bf16 peak"):
        get_profile("V100-32GB").peak("bf16")
    with pytest.raises(HardwareError, match="did you mean A100-80GB"):
        get_profile("A100-80G")


def test_calibration_reproduces_the_baseline():
    f = calibrated_efficiency()
    assert 0.25 < f < 0.4  # the paper: 30 % of peak, the rest of the step being small
    st = step_time(paper_shape("1.2B"), paper_layout(1, 1), get_profile("V100-32GB"), f)
    assert st.hardware_flops_per_device() == pytest.approx(BASELINE_FLOPS, rel=1e-9)


def test_weak_scaling_matches_the_paper_within_8_points():
    rows = predicted_scaling(get_profile("V100-32GB"), calibrated_efficiency())
    assert [(r["model"], r["gpus"]) for r in rows] == [
        ("1.2B", 1), ("2.5B", 2), ("4.2B", 4), ("8.3B", 8),
        ("1.2B", 64), ("2.5B", 128), ("4.2B", 256), ("8.3B", 512)]
    for r in rows:
        error = abs(r["predicted"] - r["paper"])
        limit = 10 if (r["model"], r["gpus"]) == KNOWN_MISS else 8
        assert error <= limit, (r["model"], r["gpus"], r["predicted"], r["paper"])
    # Efficiency falls as tensor parallelism grows, and again with data parallelism.
    mp = [r["predicted"] for r in rows[:4]]
    assert mp == sorted(mp, reverse=True)
    assert all(b["predicted"] < a["predicted"] for a, b in zip(rows[:4], rows[4:]))


def test_time_model_responds_to_the_layout():
    hw, f = get_profile("A100-80GB"), 0.5
    shape = paper_shape("8.3B")
    base = Layout(tp=8, pp=4, dp=4, micro_batch=1, num_microbatches=16, precision="bf16")
    t = step_time(shape, base, hw, f)
    # Interleaving shrinks the bubble; more micro batches dilute it; full recompute costs
    # a forward; a slower network slows the data-parallel sync.
    assert step_time(shape, base.with_(vp=3), hw, f).bubble < t.bubble
    assert step_time(shape, base.with_(recompute="full"), hw, f).total > t.total
    assert t.bubble == pytest.approx((4 - 1) / 16 * (t.compute + t.elementwise + t.tp_comm
                                                     + t.pp_comm), rel=1e-9)
    slow = get_profile("A100-80GB").__class__(**{**hw.__dict__, "inter_node_bandwidth": 25e9})
    assert step_time(shape, base, slow, f).dp_comm > t.dp_comm
    assert t.mfu == pytest.approx(t.tflops_per_device * 1e12 / hw.peak("bf16"))


def test_bench_prints_the_comparison():
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "scaling.py")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    figures = dict(kv.split("=") for kv in last.split())
    assert float(figures["max_abs_error_points"]) <= 10
    assert figures["points_within_8"] == "7/8"
