"""Loss scalers: the dynamic scaler's state machine against overflow/clean tables."""
import pytest

from megatron.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler

# (scaler settings, overflow sequence (1 = inf found), scale after each update),
# worked out by hand from Megatron's rules: each overflow decrements the
# hysteresis tracker and backs off once it is <= 0; growth_interval clean steps
# in a row grow the scale and reset the tracker; an overflow resets the clean run.
TABLE = [
    (dict(initial_scale=16, min_scale=2, growth_interval=3, hysteresis=2),
     [1, 1, 1, 1, 1], [16, 8, 4, 2, 2]),
    (dict(initial_scale=16, min_scale=2, growth_interval=3, hysteresis=2),
     [1, 0, 0, 0, 1, 1], [16, 16, 16, 32, 32, 16]),
    (dict(initial_scale=16, min_scale=2, growth_interval=3, hysteresis=2),
     [0, 0, 1, 0, 0, 0, 0, 0, 0], [16, 16, 16, 16, 16, 32, 32, 32, 64]),
    (dict(initial_scale=8, min_scale=1, growth_interval=2, hysteresis=1),
     [1, 0, 0, 1, 0, 1], [4, 4, 8, 4, 4, 2]),
    (dict(initial_scale=8, min_scale=1, growth_interval=2, hysteresis=3, backoff_factor=0.25,
          growth_factor=4), [1, 1, 1, 1, 0, 0, 1], [8, 8, 2, 1, 1, 4, 4]),
]


@pytest.mark.parametrize("settings,overflows,expected", TABLE)
def test_dynamic_scaler_table(settings, overflows, expected):
    scaler = DynamicGradScaler(**settings)
    got = []
    for found_inf in overflows:
        scaler.update(bool(found_inf))
        got.append(scaler.scale)
    assert got == expected


def test_state_dict_resumes_the_state_machine():
    seq = [1, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    a = DynamicGradScaler(initial_scale=2.0 ** 10, growth_interval=3, hysteresis=2)
    for f in seq[:5]:
        a.update(f)
    b = DynamicGradScaler(initial_scale=1.0, growth_interval=3, hysteresis=2)
    b.load_state_dict(a.state_dict())
    for f in seq[5:]:
        a.update(f)
        b.update(f)
        assert a.state_dict() == b.state_dict()
    assert a.inv_scale == 1.0 / a.scale


def test_constant_scaler_never_changes():
    s = ConstantGradScaler(128.0)
    for f in (True, True, False):
        s.update(f)
    assert s.scale == 128.0
    t = ConstantGradScaler(1.0)
    t.load_state_dict(s.state_dict())
    assert t.scale == 128.0


@pytest.mark.parametrize("kwargs", [dict(initial_scale=1, min_scale=2), dict(growth_factor=1.0),
                                    dict(backoff_factor=1.5), dict(hysteresis=0),
                                    dict(growth_interval=0)])
def test_bad_settings_name_the_values(kwargs):
    with pytest.raises(ValueError) as e:
        DynamicGradScaler(**kwargs)
    assert any(str(v) in str(e.value) for v in kwargs.values())
