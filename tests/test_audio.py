"""Audio stage: 32 kHz mono → 44.1 kHz stereo, exact length, clean resampling, honest clipping."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

import torch

from tydust_gen.audio import resample as audio
from tydust_gen.base.waveform import Waveform


def tone(freq: float, seconds: float, rate: int, amp: float = 0.5, offset: float = 0.0) -> Waveform:
    t = torch.arange(round(seconds * rate), dtype=torch.float64) / rate
    return Waveform((amp * torch.sin(2 * math.pi * freq * t) + offset).float()[None], rate)


def level_db(x: torch.Tensor, freq: float, rate: int) -> float:
    """Amplitude (dB re full scale) of the spectral peak near ``freq``, Hann-windowed."""
    n = x.shape[-1]
    win = torch.hann_window(n, dtype=torch.float64)
    spec = torch.fft.rfft(x.double() * win).abs() / (win.sum() / 2)
    bin_ = round(freq * n / rate)
    return 20 * math.log10(float(spec[max(0, bin_ - 3) : bin_ + 4].max()) + 1e-30)


def test_gives_44k1_stereo_of_exact_length():
    w = audio.to_44k1_stereo(tone(440, 2.0, 32_000), 1.37)
    assert w.sample_rate == 44_100 and w.channels == 2
    assert w.num_samples == round(1.37 * 44_100)
    assert torch.equal(w.samples[0], w.samples[1])


def test_resampler_suppresses_the_image_of_high_partials():
    """A 14 kHz tone at 32 kHz must not leave an image at 18 kHz after resampling to 44.1 kHz."""
    out = audio.resample(tone(14_000, 1.0, 32_000))
    x = out.samples[0, 2000:-2000]
    wanted = level_db(x, 14_000, 44_100)
    image = level_db(x, 18_000, 44_100)
    assert wanted > -7.0  # the tone itself survives (0.5 amplitude = -6 dB)
    assert image - wanted < -60.0


def test_dc_offset_and_overs_pass_through_unclamped():
    """DC removal and peak control belong to the mastering stage; resampling must not clip or re-centre."""
    w = audio.to_44k1_stereo(tone(440, 1.0, 32_000, amp=1.2, offset=0.35), 1.0)
    assert abs(float(w.samples.mean()) - 0.35) < 0.01
    assert float(w.samples.max()) > 1.4


def test_pcm16_is_interleaved_full_scale():
    w = Waveform(torch.tensor([[1.0, -1.0], [0.0, 0.5]]), 44_100)
    pcm = torch.frombuffer(bytearray(audio.to_pcm16(w)), dtype=torch.int16).tolist()
    assert pcm == [32767, 0, -32767, 16384]


@settings(max_examples=60, deadline=None)
@given(
    frames=st.integers(0, 3 * audio._PCM_PIECE + 7),
    channels=st.sampled_from([1, 2]),
    scale=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_pcm16_matches_clip_scale_round_for_any_length_and_level(frames, channels, scale, seed):
    """Any length (whole pieces and a ragged last one), levels past full scale: the whole-array formula."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((channels, frames)) * scale).astype(np.float32)
    expected = np.rint(np.clip(x, -1.0, 1.0) * np.float32(audio.PCM_MAX)).astype("<i2").T.tobytes()
    got = audio.to_pcm16(Waveform(torch.from_numpy(x), 44_100))
    assert got == expected
    # and the transposed (non-contiguous) view a caller may hand over
    assert audio.to_pcm16(Waveform(torch.from_numpy(np.ascontiguousarray(x.T)).T, 44_100)) == expected


def _one_call_resample(x: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    import torchaudio.functional as AF

    return AF.resample(x, orig, new, lowpass_filter_width=audio.RESAMPLE_LOWPASS_WIDTH, rolloff=audio.RESAMPLE_ROLLOFF,
                       resampling_method="sinc_interp_kaiser", beta=audio.RESAMPLE_BETA)  # fmt: skip


def _nan_filled_empty():
    """``torch.empty`` that fills with NaN, so a sample the resampler does not write shows."""
    real = torch.empty

    def empty(*args, **kwargs):
        return real(*args, **kwargs).fill_(float("nan"))

    return real, empty


@settings(max_examples=40, deadline=None)
@given(
    rate=st.sampled_from([32_000, 48_000, 22_050, 96_000, 16_000]),
    frames=st.integers(1, 160_000),
    channels=st.sampled_from([1, 2]),
    piece=st.integers(1, 600),
    seed=st.integers(0, 2**32 - 1),
)
@example(rate=32_000, frames=47_561, channels=1, piece=1024, seed=0)  # torchaudio's float32 length is one short here
@example(rate=48_000, frames=142_683, channels=2, piece=1024, seed=0)
def test_resampling_piece_by_piece_is_torchaudios_one_call_result(rate, frames, channels, piece, seed):
    """Pieces of any size (down to one period), any length and rate: every sample of ceil(N x 44100 / rate)
    written, and equal to the one-call resampler's (of the audio and the silence it assumes after it) up to
    float32 summation order (the convolution may sum a short piece in another order: 7e-7 seen)."""
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((channels, frames)).astype(np.float32))
    saved, audio.RESAMPLE_PIECE_FRAMES = audio.RESAMPLE_PIECE_FRAMES, piece
    real, torch.empty = _nan_filled_empty()
    try:
        got = audio.resample(Waveform(x, rate)).samples
    finally:
        audio.RESAMPLE_PIECE_FRAMES, torch.empty = saved, real
    exact = -(-frames * audio.TARGET_SAMPLE_RATE // rate)
    want = _one_call_resample(torch.nn.functional.pad(x, (0, rate)), rate, audio.TARGET_SAMPLE_RATE)[:, :exact]
    assert got.shape == (channels, exact)
    torch.testing.assert_close(got, want, rtol=0.0, atol=2e-6 * float(x.abs().max()))


@settings(max_examples=25, deadline=None)
@given(
    frames=st.integers(1, 160_000),
    seconds=st.floats(0.001, 2.2),
    channels=st.sampled_from([1, 2]),
    piece=st.integers(1, 600),
    seed=st.integers(0, 2**32 - 1),
)
@example(frames=47_561, seconds=1.49, channels=1, piece=1024, seed=0)
def test_44k1_stereo_is_resample_then_both_sides_then_exact_length(frames, seconds, channels, piece, seed):
    """Written straight into the final array: the same as resampling, copying mono to both sides and trimming
    or zero-padding to the length, one step after the other."""
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((channels, frames)).astype(np.float32))
    saved, audio.RESAMPLE_PIECE_FRAMES = audio.RESAMPLE_PIECE_FRAMES, piece
    real, torch.empty = _nan_filled_empty()
    try:
        got = audio.to_44k1_stereo(Waveform(x, 32_000), seconds).samples
    finally:
        audio.RESAMPLE_PIECE_FRAMES, torch.empty = saved, real
    exact = -(-frames * audio.TARGET_SAMPLE_RATE // 32_000)
    want = _one_call_resample(torch.nn.functional.pad(x, (0, 32_000)), 32_000, audio.TARGET_SAMPLE_RATE)[:, :exact]
    want = want.expand(2, -1)
    n = round(seconds * audio.TARGET_SAMPLE_RATE)
    want = torch.nn.functional.pad(want, (0, max(0, n - want.shape[-1])))[:, :n]
    assert got.shape == (2, n) and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0.0, atol=2e-6 * float(x.abs().max()))
    assert torch.equal(got[0], got[1]) or channels == 2
