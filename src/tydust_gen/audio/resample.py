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
from tydust_gen.base.errors import UsageError
from tydust_gen.base.waveform import Waveform

TARGET_SAMPLE_RATE = 44_100  # Hz, what game engines expect
TARGET_CHANNELS = 2
# Kaiser-windowed sinc: 64 zero crossings, cutoff at 94.76 % of the lower Nyquist.
RESAMPLE_LOWPASS_WIDTH = 64
RESAMPLE_ROLLOFF = 0.9475937167399596
RESAMPLE_BETA = 14.769656459379492
PCM_MAX = 32767  # int16 full scale


RESAMPLE_PIECE_FRAMES = 1024  # the resampler's input periods per piece (10 s of 32 kHz input)


def _resampler(orig: int, new: int):
    """torchaudio's resampler with the parameters above; it builds its filter bank once, for every piece."""
    import torch
    import torchaudio.transforms as AT

    return AT.Resample(
        orig, new, resampling_method="sinc_interp_kaiser", lowpass_filter_width=RESAMPLE_LOWPASS_WIDTH,
        rolloff=RESAMPLE_ROLLOFF, beta=RESAMPLE_BETA, dtype=torch.float32,  # the bank resample() builds for float32
    )  # fmt: skip


RESAMPLE_BANK_LIMIT_BYTES = 8 << 20  # the largest filter bank built: every standard rate from 4 to 768 kHz needs
# at most 2.9 MB (32 kHz -> 44.1 kHz: 0.8 MB); a bank near 64 MB already took a second per second of audio


def filter_bank_bytes(orig: int, new: int) -> int:
    """Bytes of torchaudio's filter bank for ``orig`` -> ``new`` Hz with the parameters above: one row of
    ``2 x width + orig / g`` taps for each of the ``new / g`` output phases (g = gcd). Rates that share few
    factors make it huge: 44,099 Hz -> 44.1 kHz would need 7.8 GB."""
    import math

    g = math.gcd(orig, new)
    period_in, period_out = orig // g, new // g
    width = math.ceil(RESAMPLE_LOWPASS_WIDTH * period_in / (min(period_in, period_out) * RESAMPLE_ROLLOFF))
    return 4 * period_out * (2 * width + period_in)


def resampled_length(n: int, orig: int, new: int) -> int:
    """``ceil(n x new / orig)``, in integers (torchaudio computes it in float32 and can come out one short)."""
    return -(-n * new // orig)


def _resample_into(samples, orig: int, new: int, out) -> None:
    """Resample ``samples`` ``[C, N]`` (C = 1 fills every row of ``out``) into ``out`` ``[C', M]``: its first
    ``M <= resampled_length(N)`` samples, as torchaudio's one-call ``resample`` gives them for ``samples``
    followed by silence (which it assumes past the end anyway).

    The resampler maps each period of ``orig / g`` input samples (g = gcd) onto ``new / g`` output samples.
    A piece of whole periods, read with a period-aligned margin wider than the filter's reach on each
    side, therefore gives exactly the one-call output over its own periods, and the track is done piece
    by piece into ``out``: no whole-track temporaries (the one-call version held the padded input, the
    filter's output and its reordered copy at once: +0.55 GiB for 600 s).
    """
    import math

    import torch

    if filter_bank_bytes(orig, new) > RESAMPLE_BANK_LIMIT_BYTES:
        raise UsageError(
            f"{orig} Hz audio cannot be resampled to {new} Hz here (its filter would need "
            f"{filter_bank_bytes(orig, new) / 1e6:,.0f} MB); convert it to 44.1 or 48 kHz first"
        )
    g = math.gcd(orig, new)
    period_in, period_out = orig // g, new // g
    resampler = _resampler(orig, new)
    margin = -(-resampler.width // period_in) * period_in + period_in  # whole periods, past the filter's reach
    n, m = samples.shape[-1], out.shape[-1]
    step = RESAMPLE_PIECE_FRAMES * period_in
    done = 0
    with torch.inference_mode():
        for start in range(0, n, step):
            first = start // period_in * period_out  # output index of this piece's first period
            if first >= m:
                break
            lo, hi = max(0, start - margin), min(n, start + step + margin)
            piece = samples[:, lo:hi].float()
            if hi == n:  # a period of silence after the end, so torchaudio's float32 length cannot cut it short
                piece = torch.nn.functional.pad(piece, (0, period_in))
            piece = resampler(piece)
            skip = (start - lo) // period_in * period_out
            count = min(step // period_in * period_out, m - first, piece.shape[-1] - skip)
            out[:, first : first + count] = piece[:, skip : skip + count]
            done = first + count
    if done != m:  # every output sample is written: out may come from torch.empty
        raise AssertionError(f"resampling wrote {done} of {m} samples")


def resample(wave: Waveform, rate: int = TARGET_SAMPLE_RATE) -> Waveform:
    """Resample ``[C, N]`` to ``rate`` Hz with the high-quality Kaiser parameters above (a piece at a time)."""

    import torch

    if wave.sample_rate == rate:
        return wave
    n = wave.samples.shape[-1]
    out = torch.empty(wave.samples.shape[0], resampled_length(n, wave.sample_rate, rate), dtype=torch.float32)
    _resample_into(wave.samples, wave.sample_rate, rate, out)
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
        UsageError: the model's rate shares too few factors with 44.1 kHz for the resampler
            (:func:`filter_bank_bytes`; every MusicGen checkpoint is 32 kHz).
    """

    import torch

    if wave.channels not in (1, TARGET_CHANNELS):
        raise ValueError(f"expected mono or stereo audio, got {wave.channels} channels")
    with memory.translated("resampling to 44.1 kHz"):
        n = round(duration_s * TARGET_SAMPLE_RATE)
        if wave.sample_rate == TARGET_SAMPLE_RATE:
            return fit_length(to_stereo(wave), duration_s)
        # Straight into the final [2, n]: both sides of a mono track, past the resampled end zeros (as
        # fit_length pads), and nothing of the track held twice.
        out = torch.empty(TARGET_CHANNELS, n, dtype=torch.float32)
        have = min(n, resampled_length(wave.samples.shape[-1], wave.sample_rate, TARGET_SAMPLE_RATE))
        out[:, have:] = 0.0
        _resample_into(wave.samples, wave.sample_rate, TARGET_SAMPLE_RATE, out[:, :have])
        return Waveform(samples=out, sample_rate=TARGET_SAMPLE_RATE)


_PCM_PIECE = 1 << 15  # frames converted at a time: the float scratch stays in the cache


def to_pcm16(wave: Waveform) -> bytearray:
    """Interleaved little-endian int16 PCM bytes of a ``[C, N]`` float waveform: ``round(clip(x, -1, 1) x 32767)``.

    Rounds half to even. Converted a piece at a time straight into the returned buffer, in one pass over
    the audio instead of four whole-track temporaries and a copy to ``bytes`` (a 90 s track: 25 ms
    instead of 0.1 s; a 600 s track holds 106 MB less while it is encoded).
    """
    import numpy as np

    x = wave.samples.detach().cpu().numpy()
    channels, n = x.shape
    buffer = bytearray(2 * channels * n)
    out = np.frombuffer(buffer, dtype="<i2").reshape(n, channels)
    scratch = np.empty((min(n, _PCM_PIECE), channels), dtype=np.float32)
    for start in range(0, n, _PCM_PIECE):
        stop = min(n, start + _PCM_PIECE)
        piece = scratch[: stop - start]
        np.multiply(x[:, start:stop].T, np.float32(PCM_MAX), out=piece)  # float32, as clipping first would be
        np.clip(piece, -PCM_MAX, PCM_MAX, out=piece)
        np.rint(piece, out=piece)
        out[start:stop] = piece
    return buffer
