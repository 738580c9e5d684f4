"""The limiter's gain curve, computed stretch by stretch, against the whole-track computation it replaced.

``reference_gain`` is the dense implementation (every sample, padded by one
look-ahead and 12 release time constants at each end): the same definition
written the straightforward way. The fast one computes only the stretches a
peak reaches and sets the gain to exactly 1 beyond 12 release time constants
after a peak, where the dense one is 1 - (reduction x e^-12); so the two agree
to a few millionths of full scale, everywhere, for sparse and dense peaks, at
the ends and across a loop's seam.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from synth import music

from tydust_gen.audio import master

SR = 44_100
TOLERANCE = 1e-5  # linear gain; the dense curve's e^-12 tails


def reference_gain(env, ceiling, sample_rate, lookahead_s=master.LIMITER_LOOKAHEAD_S,
                   release_s=master.LIMITER_RELEASE_S, circular=False):  # fmt: skip
    from scipy.ndimage import minimum_filter1d

    env = np.asarray(env, dtype=np.float64)
    n = env.size
    need = np.minimum(1.0, ceiling / np.maximum(env, 1e-12))
    prev = np.roll(need, 1)
    if not circular:
        prev[0] = 1.0
    need = np.minimum(need, prev)
    look = max(1, int(round(lookahead_s * sample_rate))) | 1
    release = max(1.0, release_s * sample_rate)
    pad = look + int(12 * release)
    padded = np.pad(need, (pad, pad), mode="wrap") if circular else np.pad(need, (pad, pad), constant_values=1.0)
    held = minimum_filter1d(padded, look, origin=-(look // 2), mode="nearest")
    reduction_db = -20.0 * np.log10(held)
    log_a = -1.0 / release
    idx = np.arange(padded.size, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_d = np.log(np.maximum(reduction_db, 0.0))
    released = np.exp(idx * log_a + np.maximum.accumulate(log_d - idx * log_a))
    gain = 10.0 ** (-released / 20.0)
    half = (look + 1) // 2
    smooth = master._moving_average(master._moving_average(gain, half), half)  # unchanged by the stretch computation
    return np.minimum(smooth[pad : pad + n], 1.0).astype(np.float32)


def check(env: np.ndarray, ceiling: float, circular: bool) -> np.ndarray:
    got = master.limiter_gain(env, ceiling, SR, circular=circular)
    want = reference_gain(env, ceiling, SR, circular=circular)
    assert got.dtype == np.float32 and got.shape == env.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE)
    assert np.all(got <= 1.0) and np.all(got > 0)
    # the reason it exists: every sample over the ceiling, and the one after it, comes down to it
    over = np.flatnonzero(env > ceiling)
    assert np.all(env[over] * got[over] <= ceiling * (1 + 1e-5))
    after = (over + 1) % env.size if circular else over[over + 1 < env.size] + 1
    assert np.all(env[after - 1] * got[after] <= ceiling * (1 + 1e-5))
    return got


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("level", [0.9, 2.0])  # a few peaks over / most of the track over
def test_music_is_limited_as_by_the_whole_track_computation(circular, level):
    env = master.peak_envelope(music(6.0, seed=11, level=0.5), circular=circular) * level
    got = check(env, 0.5, circular)
    assert got.min() < 0.9  # it did limit


@pytest.mark.parametrize("circular", [False, True])
def test_peaks_at_the_ends_and_across_the_seam(circular):
    n = 3 * SR
    last = np.full(n, 0.1, dtype=np.float32)
    last[[n // 2, n - 1]] = [0.6, 0.95]  # the last sample's release carries over the seam into the start
    got = check(last, 0.5, circular)
    assert (got[100] < 0.99) == circular
    assert got[int(1.25 * SR)] == 1.0  # 15 release time constants after a peak, before the next one's look-ahead
    first = np.full(n, 0.1, dtype=np.float32)
    first[3] = 0.9  # the first samples' look-ahead reaches back over the seam to the end
    got = check(first, 0.5, circular)
    assert (got[n - 100] < 0.99) == circular and got[3] < 0.56


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    n=st.integers(1, 30_000),
    peaks=st.lists(st.tuples(st.floats(0, 1), st.floats(1.0001, 8.0)), min_size=0, max_size=40),
    burst=st.booleans(),
    circular=st.booleans(),
)
def test_any_peaks_are_limited_as_by_the_whole_track_computation(n, peaks, burst, circular):
    env = np.full(n, 0.3, dtype=np.float32)
    for where, height in peaks:
        at = min(int(where * n), n - 1)
        env[at : at + (400 if burst else 1)] = height  # a single sample, or a dense stretch of peaks
    check(env, 1.0, circular)


def test_nothing_over_the_ceiling_is_unity():
    assert np.array_equal(master.limiter_gain(np.full(1000, 0.5), 0.5, SR), np.ones(1000, np.float32))
    assert master.limiter_gain(np.zeros(0), 0.5, SR).shape == (0,)


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize(("seed", "drive_db"), [(1, 3.0), (2, 8.0), (3, 14.0)])
def test_the_limiter_keeps_the_ceiling_and_reports_the_peak_it_leaves(seed, drive_db, circular):
    """The output's true peak, measured again from scratch, is at or under the ceiling and is the one reported
    (the static trim after the gain curve is accounted for, not re-scanned)."""
    audio = master.remove_dc(music(4.0, seed=seed, level=0.5), SR) * np.float32(10 ** (drive_db / 20))
    out, reduction_db, peak_dbtp = master.limit_true_peak(audio, SR, -1.0, circular=circular)
    measured = master.true_peak(out, circular=circular)
    assert measured <= -1.0 + 1e-6
    assert peak_dbtp == pytest.approx(measured, abs=1e-4)
    assert reduction_db > 0.5  # it did limit
