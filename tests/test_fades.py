"""Equal-power fades: exact length, monotone, errors."""

from __future__ import annotations

import numpy as np
import pytest

from tydust_gen.audio.master import apply_fades, equal_power_curve
from tydust_gen.base.errors import SettingsError

SR = 44_100


def test_fades_have_the_stated_length_and_are_monotone():
    x = np.ones((2, 3 * SR), dtype=np.float32)
    y = apply_fades(x, SR, fade_in_s=0.5, fade_out_s=1.25)
    env = y[0]
    n_in, n_out = int(0.5 * SR), int(1.25 * SR)
    assert env[0] == 0.0 and env[-1] == 0.0
    assert np.all(np.diff(env[:n_in]) >= 0) and np.all(np.diff(env[: n_in // 2]) > 0)
    assert np.all(env[n_in : 3 * SR - n_out] == 1.0)  # exactly n_in and n_out samples are touched
    assert np.all(np.diff(env[-n_out:]) <= 0) and np.all(np.diff(env[-n_out // 2 :]) < 0)
    assert env[-n_out - 1] == 1.0 and env[-n_out] <= 1.0
    assert np.array_equal(y[0], y[1])
    assert np.array_equal(x, np.ones((2, 3 * SR), dtype=np.float32))  # input untouched


def test_equal_power_curves_are_quarter_waves():
    n = 1000
    rise, fall = equal_power_curve(n), equal_power_curve(n, rising=False)
    k = np.arange(n)
    assert np.allclose(rise, np.sin(np.pi / 2 * k / n), atol=1e-6)
    assert np.allclose(fall, np.cos(np.pi / 2 * (k + 1) / n), atol=1e-6)
    assert np.array_equal(fall, rise[::-1])
    # a fade-in and the fade-out one sample behind it sum to constant power
    assert np.allclose(rise[1:] ** 2 + fall[:-1] ** 2, 1.0, atol=1e-5)


def test_zero_fades_change_nothing():
    x = np.random.default_rng(0).standard_normal((2, 1000)).astype(np.float32)
    assert np.array_equal(apply_fades(x, SR), x)


@pytest.mark.parametrize(
    ("fade_in", "fade_out"),
    [(-0.1, 0.0), (0.0, -1.0), (2.5, 0.0), (0.0, 2.1), (1.5, 1.0), (float("nan"), 0.0)],
)
def test_bad_fades_raise(fade_in, fade_out):
    x = np.zeros((2, 2 * SR), dtype=np.float32)
    with pytest.raises(SettingsError):
        apply_fades(x, SR, fade_in_s=fade_in, fade_out_s=fade_out)
