"""Beat grid: tempo, beats and downbeats of synthetic music with a known tempo and meter; no beat in pads or noise."""

from __future__ import annotations

import numpy as np
import pytest
from synth import SR, ambient, groove, groove_beats

from tydust_gen.audio.beats import CLEAR_BEAT_CONFIDENCE, detect_beats, pattern_shift
from tydust_gen.base.errors import SettingsError
from tydust_gen.base.settings import beats_per_bar, parse_meter

SECONDS = 16.0


# (bpm, beats per bar, pickup beats before the first downbeat, prior bpm as a prompt file would give it)
CASES = [
    (123.0, 4, 1, None),
    (97.3, 4, 2, None),
    (140.0, 3, 1, None),
    (150.0, 4, 3, None),
    (174.0, 4, 0, 174.0),
    (86.0, 4, 3, 86.0),
    (112.0, 3, 2, 110.0),
]


def nearest_ms(positions: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Distance of each position to the nearest true one, ms."""
    d = np.abs(np.asarray(positions, dtype=float)[:, None] - truth[None, :]).min(axis=1)
    return d / SR * 1000.0


@pytest.mark.parametrize(("bpm", "bpb", "pickup", "prior"), CASES)
def test_tempo_beats_and_downbeats_of_a_known_groove(bpm, bpb, pickup, prior):
    x = groove(SECONDS, bpm=bpm, beats_per_bar=bpb, pickup_beats=pickup, seed=int(bpm))
    grid = detect_beats(x, SR, bpm_prior=prior, beats_per_bar=bpb)
    assert grid.clear and grid.confidence >= CLEAR_BEAT_CONFIDENCE
    assert abs(grid.bpm - bpm) / bpm < 0.01, grid.bpm
    true_beats, true_downbeats = groove_beats(SECONDS, bpm=bpm, beats_per_bar=bpb, pickup_beats=pickup)
    assert len(grid.beats) >= 0.8 * len(true_beats)
    assert nearest_ms(grid.beats, true_beats).max() <= 20.0
    # the bar phase is found although the music starts with a pickup: every grid downbeat is a true one
    found = grid.downbeats(0, x.shape[1] - 1)
    assert len(found) >= len(true_downbeats) - 1
    assert nearest_ms(found, true_downbeats).max() <= 10.0


def test_the_prompt_files_bpm_decides_between_tempo_octaves():
    x = groove(SECONDS, bpm=86.0, seed=3)
    slow = detect_beats(x, SR, bpm_prior=86.0)
    fast = detect_beats(x, SR, bpm_prior=172.0)
    assert abs(slow.bpm - 86.0) < 0.86 and abs(fast.bpm - 172.0) < 1.72


@pytest.mark.parametrize(
    "make",
    [
        lambda: ambient(SECONDS, seed=1),
        lambda: (0.1 * np.random.default_rng(0).standard_normal((2, int(SECONDS * SR)))).astype(np.float32),
        lambda: np.zeros((2, 5 * SR), dtype=np.float32),
    ],
    ids=["pads", "noise", "silence"],
)
def test_music_without_a_beat_has_no_clear_grid(make):
    grid = detect_beats(make(), SR, bpm_prior=80.0)
    assert not grid.clear
    assert grid.confidence < CLEAR_BEAT_CONFIDENCE / 2
    assert grid.summary()["downbeats"] == []


def test_pattern_shift_finds_a_known_shift_of_an_offbeat_pattern():
    # kick on the beat, a louder hat on the off-beat: the fundamental alone would say little
    rate, period = 200.0, 0.5
    t = np.arange(int(8 * period * rate)) / rate

    def pattern(shift):
        phase = ((t - shift) / period) % 1.0
        return np.exp(-(np.minimum(phase, 1 - phase) * period / 0.01) ** 2) + 1.5 * np.exp(-((phase - 0.5) * period / 0.01) ** 2)

    for shift in (0.0, 0.0123, -0.061, 0.2):
        found, share_a, share_b = pattern_shift(pattern(0.0), t, pattern(shift), t, period)
        assert abs(found - shift) < 0.0005 and share_a > 0.3 and share_b > 0.3


@pytest.mark.parametrize(("meter", "beats"), [("4/4", 4), ("3/4", 3), (" 2/2", 2), ("6/8", 2), ("12/8", 4), ("3/8", 3), ("7/8", 7)])
def test_meter_beats_per_bar(meter, beats):
    assert beats_per_bar(meter) == beats
    assert parse_meter(meter) == meter.strip()


@pytest.mark.parametrize("bad", ["4", "4/3", "0/4", "17/4", "four/four", 4, True, "4/4/4"])
def test_bad_meters_are_refused(bad):
    with pytest.raises(SettingsError, match="meter"):
        parse_meter(bad)
