import math

import pytest

from minti.training import lr_schedules as S


def test_a1111_schedule_holds_each_rate_until_its_step():
    sched = S.make_lr_schedule("0.005:100, 1e-3:1000, 1e-5", total_steps=3000)
    assert sched(0) == 0.005 and sched(99) == 0.005
    assert sched(100) == 1e-3 and sched(999) == 1e-3
    assert sched(1000) == 1e-5 and sched(2999) == 1e-5


def test_a1111_schedule_keeps_last_rate_past_its_last_step():
    sched = S.make_lr_schedule(0.01, "0.01:10, 0.002:20", total_steps=50)
    assert sched(5) == 0.01 and sched(15) == 0.002 and sched(40) == 0.002


@pytest.mark.parametrize("text", ["0.005:abc", "fast", "0.01:100, 0.001:50", ""])
def test_bad_a1111_schedule_is_a_clear_error(text):
    with pytest.raises(ValueError):
        S.make_lr_schedule(text)


def test_cosine_and_linear_decay_to_zero_after_warmup():
    cos = S.make_lr_schedule(1.0, "cosine", total_steps=110, warmup_steps=10)
    lin = S.make_lr_schedule(1.0, "linear", total_steps=110, warmup_steps=10)
    assert cos(0) == pytest.approx(0.1) and lin(4) == pytest.approx(0.5)
    assert cos(10) == pytest.approx(1.0) and lin(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.5) and lin(60) == pytest.approx(0.5)
    assert cos(110) == pytest.approx(0.0, abs=1e-12) and lin(110) == pytest.approx(0.0)
    values = [cos(s) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_constant_schedule_and_warmup():
    sched = S.make_lr_schedule("5e-3", "constant", total_steps=100, warmup_steps=4)
    assert [sched(s) for s in range(5)] == pytest.approx([1.25e-3, 2.5e-3, 3.75e-3, 5e-3, 5e-3])


def test_negative_or_nan_learning_rate_is_rejected():
    for lr in (-1.0, math.nan, "nan"):
        with pytest.raises(ValueError):
            S.make_lr_schedule(lr)
    with pytest.raises(ValueError, match="schedule"):
        S.make_lr_schedule(1e-3, "exponential")
