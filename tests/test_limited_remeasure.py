"""After the limiter, only what it changed is measured again; the figures must be those of a full measurement.

``master._limit`` re-scans the true peak only around the samples the limiter's gain touched and updates
the loudness blocks only where the K-weighted difference reaches. The references here are independent of
that shortcut: :func:`master.peak_envelope` over the whole changed track, and pyloudnorm's own
``integrated_loudness`` (itself held to ``measure_loudness`` in test_loudness_meter.py). Changes are
drawn where a shortcut would break: at both ends, across a loop's seam, next to each other, and on
blocks that sit at the gates.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synth import music
from test_loudness_meter import reference as pyloudnorm_lufs  # pyloudnorm's own meter

from tydust_gen.audio import master

RATE = 44_100


@st.composite
def changed_audio(draw):
    """Audio, a scale, and a copy of the scaled audio changed (by a random gain) in a few stretches."""
    rate = draw(st.sampled_from([22_050, 44_100, 48_000]))
    channels = draw(st.integers(1, 2))
    n = draw(st.integers(int(0.5 * rate), int(3.0 * rate)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    audio = rng.standard_normal((channels, n)) * 10 ** (draw(st.floats(-60, 0)) / 20)
    quiet = draw(st.integers(0, n // 2))  # a near-silent stretch: blocks that straddle the relative gate
    audio[:, :quiet] *= 10 ** (draw(st.floats(-80, -10)) / 20)
    audio = audio.astype(np.float32)
    scale = float(np.float32(10 ** (draw(st.floats(-12, 12)) / 20)))
    before = audio * np.float32(scale)
    after = before.copy()
    starts = draw(st.lists(st.sampled_from([0, 1, n // 3, n // 2, n - 2, n - 1]) | st.integers(0, n - 1), min_size=0, max_size=5))
    for a in starts:
        e = min(n, a + draw(st.integers(1, rate // 4)))
        after[:, a:e] *= rng.uniform(0.2, 1.0, e - a).astype(np.float32)
    return rate, audio, scale, before, after


@settings(max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(changed_audio())
def test_the_updated_loudness_is_a_full_measurement(case):
    rate, audio, scale, before, after = case
    changed = np.flatnonzero(np.any(after != before, axis=0))
    runs = master._changed_runs(changed, 0, after.shape[1], False)
    updated = master._LoudnessBlocks.measure(audio, rate).changed(scale, before, after, runs).lufs
    expected = pyloudnorm_lufs(after, rate)
    if math.isinf(expected):
        assert updated == expected
    else:
        assert updated == pytest.approx(expected, abs=1e-6)


@settings(max_examples=120, deadline=None, derandomize=True, database=None)
@given(
    n=st.integers(40, 3000),
    channels=st.integers(1, 2),
    seed=st.integers(0, 2**32 - 1),
    where=st.lists(st.integers(0, 2999) | st.sampled_from([0, 1, 2999]), min_size=1, max_size=6),
    width=st.integers(1, 30),
    circular=st.booleans(),
)
def test_the_rescanned_peak_is_the_full_scans(n, channels, seed, where, width, circular):
    rng = np.random.default_rng(seed)
    before = (rng.standard_normal((channels, n)) * 0.3).astype(np.float32)
    after = before.copy()
    for a in where:
        a %= n
        # a change that raises the reconstruction between samples (alternating signs) as well as one that lowers it
        after[:, a : a + width] = np.where(np.arange(min(width, n - a)) % 2, 0.9, -0.9).astype(np.float32)
    changed = np.flatnonzero(np.any(after != before, axis=0))
    runs = master._changed_runs(changed, master._PEAK_FILTER_SPAN, n, circular)
    env = master.peak_envelope(before, circular=circular)
    got = master._peak_after_change(env, after, runs, oversample=master.TRUE_PEAK_OVERSAMPLE, circular=circular)
    assert got == pytest.approx(float(master.peak_envelope(after, circular=circular).max()), rel=1e-6)


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("distance", range(1, master._PEAK_FILTER_SPAN))  # the peak at c reads up to c + span
def test_a_change_as_far_as_the_filter_reaches_moves_the_peak(distance, sign, circular):
    """An unchanged peak whose reconstruction reads one changed sample at the filter's edge: its stale value
    must not be taken (too short a reach fails here, the drawn cases above rarely put the peak there)."""
    n, c = 400, 200
    before = np.zeros((1, n), np.float32)
    before[0, c : c + 2] = 1.0  # the loudest spot: between c and c + 1
    after = before.copy()
    after[0, c + 1 + distance] = sign * 0.9
    changed = np.flatnonzero(after[0] != before[0])
    runs = master._changed_runs(changed, master._PEAK_FILTER_SPAN, n, circular)
    env = master.peak_envelope(before, circular=circular)
    got = master._peak_after_change(env, after, runs, oversample=master.TRUE_PEAK_OVERSAMPLE, circular=circular)
    want = float(master.peak_envelope(after, circular=circular).max())
    assert abs(want - float(env.max())) > 1e-4  # the change does move the peak
    assert got == pytest.approx(want, rel=1e-6)


def test_runs_wrap_round_a_loops_seam_and_stay_inside_a_track():
    span = 3
    assert master._changed_runs(np.array([0, 9]), span, 10, True) == [(0, 4), (6, 10)]  # 4 and 5 are 4 away
    assert master._changed_runs(np.array([0, 7]), span, 8, True) == [(0, 8)]
    assert master._changed_runs(np.array([5]), 5, 10, True) == [(0, 10)]
    assert master._changed_runs(np.array([1]), span, 100, True) == [(0, 5), (98, 100)]
    assert master._changed_runs(np.array([1]), span, 100, False) == [(0, 5)]
    assert master._changed_runs(np.array([50, 57, 70]), span, 100, False) == [(47, 61), (67, 74)]
    assert master._changed_runs(np.array([], dtype=np.int64), span, 100, False) == []


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("seed", [1, 2])
def test_limiting_music_gives_the_figures_of_a_full_measurement(monkeypatch, seed, circular):
    """The whole limiter pass, shortcut against full re-measurement, and both against the independent meters."""
    x = music(20.0, sr=RATE, seed=seed, dc=0.0, level=0.3)
    x = master.remove_dc(np.ascontiguousarray(np.vstack([x[0], x[-1] * 0.9]), dtype=np.float32), RATE)
    env = master.peak_envelope(x, circular=circular)
    g = np.float32(master.db_to_gain(-1.0 + 1.0 - float(master.gain_to_db(env.max()))))  # the top peak 1 dB over

    def limit():
        blocks = master._LoudnessBlocks.measure(x, RATE)
        return master._limit(
            x, RATE, -1.0, env * g, master.LIMITER_LOOKAHEAD_S, master.LIMITER_RELEASE_S, circular,
            loudness=blocks, scale=float(g),
        )  # fmt: skip

    untouched = x.copy()
    out, reduction, tp, level = limit()
    np.testing.assert_array_equal(x, untouched)  # the input is only read (the output is made in a copy)
    touched = np.mean(master.limiter_gain(env * g, master.db_to_gain(-1.0), RATE, circular=circular) != 1.0)
    assert 0 < touched < master._RESCAN_ALL_ABOVE  # the shortcut ran
    monkeypatch.setattr(master, "_RESCAN_ALL_ABOVE", -1.0)
    full_out, full_reduction, full_tp, full_level = limit()
    np.testing.assert_allclose(out, full_out, rtol=0, atol=1e-6)
    assert reduction == pytest.approx(full_reduction, abs=1e-4)
    assert tp == pytest.approx(full_tp, abs=1e-4) and tp <= -1.0
    assert master.true_peak(out, circular=circular) <= -1.0 + 1e-5
    assert level == pytest.approx(full_level, abs=1e-5)
    assert level == pytest.approx(pyloudnorm_lufs(out, RATE), abs=1e-5)


def test_master_reads_any_strided_input_and_leaves_it_alone():
    """master() no longer copies its input first: a reversed view (negative strides) or float64 must master
    exactly like a contiguous float32 copy, limiter engaged, and the input must be left as it was."""
    x = music(6.0, sr=RATE, seed=5, dc=0.0, level=0.5)
    x = master.remove_dc(np.ascontiguousarray(np.vstack([x[0], x[-1] * 0.8]), dtype=np.float32), RATE)
    backwards = x[:, ::-1]
    keep = backwards.copy()
    reference = master.master(np.ascontiguousarray(backwards), RATE)
    assert reference.limiter_max_reduction_db > 0
    for samples in (backwards, backwards.astype(np.float64)):
        result = master.master(samples, RATE)
        np.testing.assert_array_equal(result.samples, reference.samples)
        assert not np.shares_memory(result.samples, samples)
    np.testing.assert_array_equal(backwards, keep)
