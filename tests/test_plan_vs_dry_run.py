"""The planner's analytic memory model against the dry run (the real code on fake tensors).

Layouts of GPT-2 345M and Llama 2 7B at full width, a few layers, 8 to 64 ranks
(``megatron/planning/crosscheck.py``): the model's static bytes must be the dry run's,
its activation peak and total peak within 10 % of the dry run's (the activation peak
not more than 5 % under), for the first, a middle and the last pipeline stage.
bench/RESULTS.md ("Memory model vs the dry run") has the table.
"""
import pytest

from megatron import mpu
from megatron.planning.crosscheck import CASES, compare

TOLERANCE_PCT = 10.0
UNDER_PCT = 5.0
# Adam keeps one fp32 step counter per parameter tensor; the model leaves them out.
STEP_COUNTER_BYTES = 4


@pytest.fixture(scope="module")
def rows():
    out = []
    for case in CASES:
        out += compare(*case)
    return out


def _where(r):
    return f"{r['name']} stage {r['stage']}"


def test_cases_cover_the_layout_space(rows):
    layouts = " ".join(r["layout"] + " " + r["precision"] for r in rows)
    for token in ("TP1", "TP8", "PP4", "VP2", "SP", "DO", "none", "selective", "full",
                  "fp32", "bf16"):
        assert token in layouts, token
    assert {r["world"] for r in rows} >= {8, 16, 32, 64}
    assert len({(r["name"], r["stage"]) for r in rows}) == len(rows) >= 15


def test_static_bytes_are_the_dry_runs(rows):
    for r in rows:
        m, d = r["model"], r["dry_run"]
        for key in ("params", "grads", "masters"):
            assert m[key] == d[key], f"{_where(r)} {key}: model {m[key]} dry run {d[key]}"
        counters = d["optimizer_state"] - m["optimizer_state"]
        assert 0 <= counters <= STEP_COUNTER_BYTES * 64, \
            f"{_where(r)} optimizer state: model {m['optimizer_state']} dry run {d['optimizer_state']}"


def test_schedules_hold_as_many_micro_batches(rows):
    for r in rows:
        assert r["model"]["in_flight"] == r["dry_run"]["in_flight"], _where(r)


@pytest.mark.parametrize("figure", ["activations", "peak"])
def test_peaks_within_10_percent_of_the_dry_run(rows, figure):
    bad = [f"{_where(r)}: model {r['model'][figure]} dry run {r['dry_run'][figure]} "
           f"({r['error_pct'][figure]:+.1f} %)" for r in rows
           if abs(r["error_pct"][figure]) > TOLERANCE_PCT]
    assert not bad, "\n".join(bad)


def test_activation_peaks_not_under_the_dry_run_by_more_than_5_percent(rows):
    # Under-prediction is the unsafe side for a planner that drops what does not fit: the
    # interleaved first stage was -8.4 % while the model left out the [s, b, h] tensors
    # the schedules keep bound at a backward (memory_model.p2p_tensors).
    bad = [f"{_where(r)}: {r['error_pct']['activations']:+.1f} %" for r in rows
           if r["error_pct"]["activations"] < -UNDER_PCT]
    assert not bad, "\n".join(bad)


@pytest.fixture(autouse=True)
def _no_model_parallel_state():
    yield
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
