"""Audio stage: 32 kHz model output (mono, or a stereo model's two channels) → 44.1 kHz stereo, exactly the requested length.

Resampling uses torchaudio's windowed-sinc resampler with a Kaiser window and a
rolloff below the default: the default rolloff (0.99) lets a −6 dBc image of
high partials through; these parameters push it to about −131 dBc at the same
speed (measured, see FACTS.md). MusicGen output is not zero-mean (the tiny test
model has a large DC offset), so nothing here assumes it is; the mastering
stage (``master.py``) removes DC and keeps true peaks under a ceiling, so
nothing is clamped here.
"""

from __future__ import annotations

from tydust_gen.base import memory
from tydust_gen.base.waveform import Waveform

TARGET_SAMPLE_RATE = 44_100  # Hz, what game engines expect
TARGET_CHANNELS = 2
# Kaiser-windowed sinc: 64 zero crossings, cutoff at 94.76 % of the lower Nyquist.
RESAMPLE_LOWPASS_WIDTH = 64
RESAMPLE_ROLLOFF = 0.9475937167399596
RESAMPLE_BETA = 14.769656459379492
PCM_MAX = 32767  # int16 full scale


def resample(wave: Waveform, rate: int = TARGET_SAMPLE_RATE) -> Waveform:
    """Resample ``[C, N]`` to ``rate`` Hz with the high-quality Kaiser parameters above."""
    import torchaudio.functional as AF

    if wave.sample_rate == rate:
        return wave
    out = AF.resample(
        wave.samples.float(),
        wave.sample_rate,
        rate,
        lowpass_filter_width=RESAMPLE_LOWPASS_WIDTH,
        rolloff=RESAMPLE_ROLLOFF,
        resampling_method="sinc_interp_kaiser",
        beta=RESAMPLE_BETA,
    )
    return Waveform(samples=out, sample_rate=rate)


def to_stereo(wave: Waveform) -> Waveform:
    """Mono ``[1, N]`` → identical left/right ``[2, N]``; stereo (a stereo MusicGen's own left/right) passes through."""
    if wave.channels == TARGET_CHANNELS:
        return wave
    if wave.channels != 1:
        raise ValueError(f"expected mono or stereo audio, got {wave.channels} channels")
    return Waveform(samples=wave.samples.expand(2, -1).contiguous(), sample_rate=wave.sample_rate)


def fit_length(wave: Waveform, duration_s: float) -> Waveform:
    """Trim (or zero-pad by at most a few samples) to exactly ``round(duration_s × rate)`` samples."""
    import torch

    n = round(duration_s * wave.sample_rate)
    samples = wave.samples
    if samples.shape[-1] >= n:
        samples = samples[..., :n]
    else:
        samples = torch.nn.functional.pad(samples, (0, n - samples.shape[-1]))
    return Waveform(samples=samples.contiguous(), sample_rate=wave.sample_rate)


def to_44k1_stereo(wave: Waveform, duration_s: float) -> Waveform:
    """32 kHz model output (mono or stereo) → float32 ``[2, N]`` at 44.1 kHz, N = round(duration_s × 44,100); not clamped.

    Raises:
        GenerationError: memory ran out (one line, with what to do).
    """
    with memory.translated("resampling to 44.1 kHz"):
        return fit_length(to_stereo(resample(wave)), duration_s)


_PCM_PIECE = 1 << 15  # frames converted at a time: the float scratch stays in the cache


def to_pcm16(wave: Waveform) -> bytes:
    """Interleaved little-endian int16 PCM bytes of a ``[C, N]`` float waveform: ``round(clip(x, -1, 1) x 32767)``.

    Rounds half to even. Converted a piece at a time into the interleaved output, in one pass over the
    audio instead of four whole-track temporaries (a 90 s track: 25 ms instead of 0.1 s).
    """
    import numpy as np

    x = wave.samples.detach().cpu().numpy()
    channels, n = x.shape
    out = np.empty((n, channels), dtype="<i2")
    scratch = np.empty((min(n, _PCM_PIECE), channels), dtype=np.float32)
    for start in range(0, n, _PCM_PIECE):
        stop = min(n, start + _PCM_PIECE)
        piece = scratch[: stop - start]
        np.multiply(x[:, start:stop].T, np.float32(PCM_MAX), out=piece)  # float32, as clipping first would be
        np.clip(piece, -PCM_MAX, PCM_MAX, out=piece)
        np.rint(piece, out=piece)
        out[start:stop] = piece
    return out.tobytes()
