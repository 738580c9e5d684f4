"""Loudness, true peak, limiter and the encoded-ceiling loop, on synthetic signals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from synth import SR, encode, music

from tydust_gen.audio.master import DC_HIGHPASS_HZ, master, measure_loudness, remove_dc, true_peak
from tydust_gen.base.errors import SettingsError
from tydust_gen.export.loudness import (
    ceiling_margin_for,
    decode_audio,
    encoded_true_peak,
    master_for_encoding,
)


def tone(freq: float, seconds: float, amp: float, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    x = amp * np.sin(2 * np.pi * freq * t + phase)
    return np.stack([x, x]).astype(np.float32)


def level_db(x: np.ndarray) -> float:
    return 20 * math.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def test_true_peak_sees_intersample_peak():
    # fs/4 at 45 degrees: every sample is +-0.707, the waveform between them reaches 1.0
    x = tone(SR / 4, 1.0, 1.0, phase=np.pi / 4)
    assert 20 * math.log10(np.abs(x).max()) == pytest.approx(-3.01, abs=0.01)
    # a whole number of periods, measured as a loop: no edge transients
    assert true_peak(x, circular=True) == pytest.approx(0.0, abs=0.05)


def test_silence_measures_minus_infinity_and_masters_unchanged():
    x = np.zeros((2, SR), dtype=np.float32)
    assert measure_loudness(x, SR) == -math.inf
    assert true_peak(x) == -math.inf
    result = master(x, SR)
    assert result.gain_db == 0.0 and not np.any(result.samples)


def test_remove_dc_kills_offset_and_keeps_music_band():
    x = tone(1000.0, 2.0, 0.25) + 0.3
    y = remove_dc(x, SR)
    assert np.abs(y.mean(axis=1)).max() < 1e-3
    assert level_db(y[:, SR // 2 : -SR // 2]) == pytest.approx(level_db(tone(1000.0, 1.0, 0.25)), abs=0.05)
    # 2nd-order Butterworth at 20 Hz, forward and backward: 10 log10(1 + (20 Hz / f)^4) dB
    for freq, loss_db in ((20.0, 6.02), (40.0, 0.53), (60.0, 0.11)):
        low = tone(freq, 4.0, 0.25)
        kept = level_db(remove_dc(low, SR)[:, SR:-SR]) - level_db(low[:, SR:-SR])
        assert kept == pytest.approx(-loss_db, abs=0.05)


def test_master_leaves_dc_removal_to_the_caller():
    """By default master() does not filter again what remove_dc already filtered (the pipeline's order)."""
    low = remove_dc(tone(20.0, 4.0, 0.25), SR)
    faded = low.copy()
    faded[:, :SR] *= np.linspace(0.0, 1.0, SR, dtype=np.float32)  # a fade-in: its mean is not the DC offset
    for result in (master(faded, SR, target_lufs=None), master(faded, SR, target_lufs=None, highpass_hz=None)):
        assert result.gain_db == 0.0 and np.array_equal(result.samples, faded)
    # asked to, it runs the filter again: the 20 Hz tone loses another 6 dB
    again = master(low, SR, target_lufs=None, highpass_hz=DC_HIGHPASS_HZ).samples
    assert level_db(again[:, SR:-SR]) - level_db(low[:, SR:-SR]) == pytest.approx(-6.02, abs=0.05)


@pytest.mark.parametrize("target", [-14.0, -20.0])
def test_reachable_target_within_half_lu_and_under_ceiling(target):
    x = music(8.0, seed=1, dc=0.3)
    result = master(x, SR, target_lufs=target, ceiling_dbtp=-1.0, highpass_hz=DC_HIGHPASS_HZ)  # raw: DC in
    assert result.target_reached
    assert abs(measure_loudness(result.samples, SR) - target) <= 0.5
    assert true_peak(result.samples) <= -1.0 + 1e-6
    assert result.dc_offset[0] == pytest.approx(0.3, abs=0.01)
    assert result.output_lufs == pytest.approx(measure_loudness(result.samples, SR), abs=0.01)


def test_limiter_engages_to_reach_target():
    x = music(8.0, seed=1)
    result = master(x, SR, target_lufs=-11.0, ceiling_dbtp=-1.0)
    assert 0.5 < result.limiter_max_reduction_db <= 4.0 + 1e-3
    assert result.target_reached
    assert abs(measure_loudness(result.samples, SR) + 11.0) <= 0.5
    assert true_peak(result.samples) <= -1.0 + 1e-6


def test_unreachable_target_reports_reached_loudness_and_never_clips():
    x = music(8.0, seed=2, dc=0.3)
    result = master(x, SR, target_lufs=-3.0, ceiling_dbtp=-1.0, max_limiting_db=4.0, highpass_hz=DC_HIGHPASS_HZ)
    assert not result.target_reached
    measured = measure_loudness(result.samples, SR)
    assert result.output_lufs == pytest.approx(measured, abs=0.01)
    assert measured < -3.0 - 0.5
    assert result.limiter_max_reduction_db <= 4.0 + 1e-3
    assert true_peak(result.samples) <= -1.0 + 1e-6
    assert np.abs(result.samples).max() < 1.0


def test_limiter_off_settles_for_static_gain():
    x = music(8.0, seed=2)
    result = master(x, SR, target_lufs=-6.0, ceiling_dbtp=-1.0, limiter=False)
    assert result.limiter_max_reduction_db == 0.0 and not result.target_reached
    assert result.output_true_peak_dbtp == pytest.approx(-1.0, abs=0.01)
    assert result.output_lufs == pytest.approx(measure_loudness(result.samples, SR), abs=0.01)


def test_target_none_only_lowers_peaks():
    hot = tone(997.0, 2.0, 1.0)
    result = master(hot, SR, target_lufs=None, ceiling_dbtp=-1.0)
    assert result.gain_db < 0 and true_peak(result.samples) <= -1.0 + 1e-6
    quiet = tone(997.0, 2.0, 0.1)
    assert master(quiet, SR, target_lufs=None).gain_db == 0.0


@pytest.mark.parametrize(
    "kwargs",
    [{"target_lufs": float("nan")}, {"ceiling_dbtp": 1.0}, {"margin_db": -0.1}, {"target_lufs": 3.0}],
)
def test_bad_settings_raise(kwargs):
    with pytest.raises(SettingsError):
        master(tone(440.0, 1.0, 0.1), SR, **kwargs)


def test_ceiling_margin_for():
    assert ceiling_margin_for(-1.2, -1.0, 0.3) is None
    assert ceiling_margin_for(-1.0, -1.0, 0.3) is None
    assert ceiling_margin_for(-0.8, -1.0, 0.3) == pytest.approx(0.3 + 0.2 + 0.1)


def test_encoded_mp3_and_ogg_meet_the_ceiling(encoded_loop):
    enc = encoded_loop.encoded
    assert enc.ceiling_met and 1 <= enc.tries <= 3
    for path in (encoded_loop.mp3, encoded_loop.ogg):
        assert encoded_true_peak(path) <= -1.0
        assert abs(measure_loudness(decode_audio(path), SR) + 14.0) <= 0.5
    assert decode_audio(encoded_loop.ogg).shape == (2, encoded_loop.loop.loop_length)


def test_encoded_loop_retries_when_the_codec_overshoots(tmp_path):
    # no margin and a limited (dense-peaked) master: the codec's overshoot must be caught and fixed
    x = remove_dc(music(6.0, seed=4, dc=0.3), SR)
    ogg = tmp_path / "hot.ogg"
    peaks: list[float] = []

    def encode_ogg(result):
        encode(result.samples, SR, ogg)
        peaks.append(encoded_true_peak(ogg))
        return [ogg]

    enc = master_for_encoding(x, SR, encode_ogg, target_lufs=-11.0, ceiling_dbtp=-1.0, initial_margin_db=0.0)
    assert peaks[0] > -1.0  # the first, margin-less encode overshot
    assert enc.tries >= 2 and enc.ceiling_met
    assert enc.encoded_true_peaks_dbtp[0] <= -1.0


@pytest.mark.parametrize("fail", [False, True])
def test_mastering_and_encoding_scan_on_one_torch_thread_and_restore_the_count(tmp_path, fail):
    # Scans run beside the loudness meter, the encoders and the decoders: a second torch thread only
    # spins and takes their core. The count seen by the encode callback (and by the threads it starts)
    # must be 1, and the caller's count must come back afterwards, also when encoding fails.
    import threading

    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = remove_dc(music(3.0, seed=2, dc=0.3), SR)
        seen: list[int] = []

        def encode_ogg(result):
            seen.append(torch.get_num_threads())
            worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
            worker.start()
            worker.join()
            if fail:
                raise RuntimeError("encoder failed")
            ogg = tmp_path / "one.ogg"
            encode(result.samples, SR, ogg)
            return [ogg]

        if fail:
            with pytest.raises(RuntimeError, match="encoder failed"):
                master_for_encoding(x, SR, encode_ogg)
        else:
            assert master_for_encoding(x, SR, encode_ogg).ceiling_met
        assert seen == [1, 1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
