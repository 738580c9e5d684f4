"""The vectorised BS.1770 meter against pyloudnorm, the library that defines it here.

``master.measure_loudness`` runs pyloudnorm's K-weighting, blocks and gates as
whole-array operations; pyloudnorm's own ``integrated_loudness`` (a Python loop
over blocks) is the independent reference. Inputs are drawn to hit the gates:
bursts between stretches of near-silence, levels around the absolute gate,
1 to 5 channels, lengths from under one block to several seconds, three rates.
"""

from __future__ import annotations

import math

import numpy as np
import pyloudnorm
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synth import music

from tydust_gen.audio import master


def reference(audio: np.ndarray, sample_rate: int) -> float:
    """pyloudnorm's integrated loudness, on the audio padded to one block as measure_loudness documents."""
    min_len = int(math.ceil(master.MIN_LOUDNESS_BLOCK_S * sample_rate)) + 1
    if audio.shape[1] < min_len:
        audio = np.pad(audio, ((0, 0), (0, min_len - audio.shape[1])))
    with np.errstate(divide="ignore"):
        lufs = float(pyloudnorm.Meter(sample_rate).integrated_loudness(audio.T.astype(np.float64)))
    return lufs if math.isfinite(lufs) else -math.inf


@st.composite
def gated_audio(draw):
    rate = draw(st.sampled_from([8_000, 44_100, 48_000]))
    channels = draw(st.integers(1, 5))
    n = draw(st.integers(1, int(3.0 * rate)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    audio = rng.standard_normal((channels, n)) * 10 ** (draw(st.floats(-90, 0)) / 20)
    # Stretches at other levels: blocks around the relative gate (-10 LU under the gated mean), under the
    # absolute one, or in between, so both gates decide something.
    for _ in range(draw(st.integers(0, 6))):
        start = draw(st.integers(0, n - 1))
        audio[:, start : start + draw(st.integers(1, n))] *= 10 ** (draw(st.floats(-30, 0) | st.floats(-90, 0)) / 20)
    return audio.astype(np.float32), rate


@settings(max_examples=120, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(gated_audio())
def test_the_meter_is_pyloudnorms(case):
    audio, rate = case
    got, want = master.measure_loudness(audio, rate), reference(audio, rate)
    if math.isinf(want):
        assert got == want == -math.inf
    else:
        assert got == pytest.approx(want, abs=1e-6)


@settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(gated_audio(), st.integers(1, 5000))
def test_the_meter_in_pieces_is_the_whole_track_meter(case, piece):
    """The meter filters and sums a long track a piece at a time (bounded memory); with pieces of any size,
    block bounds on and next to the cuts, it must give exactly what one whole-track pass gives."""
    audio, rate = case
    whole = master._LoudnessBlocks.measure(audio, rate)
    saved = master._LOUDNESS_PIECE
    master._LOUDNESS_PIECE = piece
    try:
        pieces = master._LoudnessBlocks.measure(audio, rate)
    finally:
        master._LOUDNESS_PIECE = saved
    np.testing.assert_allclose(pieces.energy, whole.energy, rtol=1e-12, atol=0)
    want = reference(audio, rate)
    if math.isinf(want):
        assert pieces.lufs == want
    else:
        assert pieces.lufs == pytest.approx(want, abs=1e-6)


def test_the_relative_gate_is_pyloudnorms():
    """Steps of 1 dB from 0 to -15 dB: some blocks fall just above and some just under the relative gate."""
    rng = np.random.default_rng(3)
    audio = np.concatenate([rng.standard_normal((2, 22_050)) * 0.3 * 10 ** (-db / 20) for db in range(16)], axis=1)
    assert master.measure_loudness(audio, 44_100) == pytest.approx(reference(audio, 44_100), abs=1e-6)


@pytest.mark.parametrize("seconds", [0.3, 12.0])
def test_the_meter_is_pyloudnorms_on_music(seconds):
    audio = music(seconds, seed=8, level=0.4)
    assert master.measure_loudness(audio, 44_100) == pytest.approx(reference(audio, 44_100), abs=1e-6)


def test_the_meter_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="NaN or infinite"):
        master.measure_loudness(np.array([[0.1, np.nan] * 10_000]), 44_100)
    with pytest.raises(ValueError, match="at most 5 channels"):
        master.measure_loudness(np.zeros((6, 20_000)), 44_100)
    assert master.measure_loudness(np.zeros((2, 20_000)), 44_100) == -math.inf
