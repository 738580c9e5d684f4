"""Mastering stage: DC removal, loudness normalisation, true-peak limiting, fades.

Everything here works on numpy float32 arrays shaped ``[C, N]`` (channels,
samples) at the export rate (44.1 kHz in the pipeline, but any rate works) and
returns new arrays; inputs are never modified in place.

What the stage promises:

* **DC first.** MusicGen, and above all the tiny test model, can emit a large DC
  offset (FACTS.md: +0.25..+0.45). A DC offset inflates sample and true peaks,
  makes fades thump and wastes limiter headroom, while BS.1770's K-weighting
  almost ignores it. So :func:`remove_dc` subtracts each channel's mean and then
  runs a gentle, zero-phase 20 Hz high-pass, before loop folding, fades and any
  loudness work. 20 Hz is below the lowest note game music uses; the 2nd-order
  Butterworth runs forward and backward (no phase shift, -6 dB at 20 Hz,
  -0.5 dB at 40 Hz, -0.1 dB at 60 Hz). It must run exactly once: a second pass
  doubles every loss (-12 dB at 20 Hz, -1 dB at 40 Hz). Every caller has to
  remove DC before folding a loop or fading anyway, so :func:`master` leaves DC
  alone unless asked (``highpass_hz``) for audio that skipped :func:`remove_dc`.
* **Loudness** is ITU-R BS.1770-4 integrated loudness (LUFS), pyloudnorm's
  meter run as whole-array operations (:func:`measure_loudness`). **True peak**
  is the largest magnitude of the signal upsampled 4x with scipy's polyphase
  low-pass (:data:`TRUE_PEAK_OVERSAMPLE`), in dBTP, as in BS.1770 Annex 2; a
  decoder's output is measured piece by piece (:class:`TruePeakMeter`).
* **The ceiling is never broken and nothing clips.** If the loudness target
  needs more gain than the true-peak ceiling allows, a look-ahead limiter
  (:func:`limit_true_peak`) pulls the peaks down; it never reduces more than
  ``max_limiting_db`` (transparency), and beyond that the stage settles for
  less loudness and says so in :class:`MasterResult`.
* **Encoded files meet the ceiling too.** Lossy encoders raise the true peak by
  a few tenths of a dB (FACTS.md: about 0.2 dB), so the export stage masters
  with a safety margin, encodes, measures the decoded files
  (:func:`encoded_true_peak`) and re-masters with a larger margin when needed
  (:func:`ceiling_margin_for`, or the whole loop in :func:`master_for_encoding`).
* **Fades** are equal-power (quarter sine / quarter cosine) and exactly as long
  as asked (:func:`apply_fades`).

Loop mode: pass ``circular=True`` so the true-peak scan and limiter (and the DC filter, if asked)
treat the end of the array as joined to its start and keep the seam seamless.
Never fade a loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from tydust_gen.base.errors import SettingsError

DEFAULT_TARGET_LUFS = -14.0  # LUFS; the common streaming / game-audio reference level


DEFAULT_CEILING_DBTP = -1.0  # dBTP; headroom that survives MP3/OGG decoding on most players


DC_HIGHPASS_HZ = 20.0  # Hz; below the lowest musical content, well above DC drift


DC_HIGHPASS_ORDER = 2  # per pass; filtfilt doubles the slope and cancels the phase shift


TRUE_PEAK_OVERSAMPLE = 4  # x; BS.1770-4 Annex 2 minimum for 44.1/48 kHz material


_PEAK_SCAN_BLOCK = 1 << 16  # samples per block of the true-peak scan (1.5 s at 44.1 kHz)


_PEAK_FILTER_SPAN = 10  # input samples each side of the true-peak interpolation filter (as resample_poly)


LIMITER_LOOKAHEAD_S = 0.005  # s; long enough for a smooth attack, short enough not to pump


LIMITER_RELEASE_S = 0.080  # s; time constant of the gain-reduction recovery (in dB)


DEFAULT_MAX_LIMITING_DB = 4.0  # dB; more peak reduction than this stops being transparent


LOUDNESS_TOLERANCE_LU = 0.1  # LU; stop refining the limiter gain once this close to target


_LIMITER_RELEASE_SPAN = 12  # release time constants a reduction is followed for (then e^-12 of itself)


LIMITER_MAX_PASSES = 4  # limiter passes while refining the gain into the limiter


_LOUDNESS_PIECE = 1 << 18  # samples per channel the loudness meter filters at a time (6 s at 44.1 kHz)


_RESCAN_ALL_ABOVE = 0.5  # limited a larger share of the samples than this: measure the whole output again


MIN_LOUDNESS_BLOCK_S = 0.4  # s; BS.1770 gating block; shorter audio is padded with silence


_BS1770_CHANNEL_WEIGHTS = (1.0, 1.0, 1.0, 1.41, 1.41)  # L, R, C, Ls, Rs (pyloudnorm's G)


_BS1770_ABSOLUTE_GATE_LUFS = -70.0


SILENCE_DB = -math.inf


_STATIC_FIT_GUARD_DB = 1e-4  # dB; float32 rounding of a gain that lands exactly on the ceiling


@dataclass(frozen=True)
class MasterResult:
    """The mastered audio and what was measured on the way.

    Attributes:
        samples: float32 ``[C, N]``, the mastered audio.
        sample_rate: Hz.
        input_lufs: integrated loudness of the input after DC removal, LUFS
            (``-inf`` for silence).
        input_true_peak_dbtp: true peak of the input after DC removal, dBTP.
        dc_offset: mean of each channel before DC removal (linear, full scale 1.0).
        gain_db: static gain applied before the limiter, dB.
        limiter_max_reduction_db: largest gain reduction the limiter applied, dB
            (0.0 when it did not engage).
        output_lufs: integrated loudness of ``samples``, LUFS.
        output_true_peak_dbtp: true peak of ``samples``, dBTP.
        target_lufs: the requested loudness (None: loudness normalisation off).
        ceiling_dbtp: the requested true-peak ceiling, dBTP.
        margin_db: extra headroom kept below the ceiling (for lossy encoding), dB.
        target_reached: output within :data:`LOUDNESS_TOLERANCE_LU` (+ 0.1) of the
            target; always True when the target is None.
    """

    samples: np.ndarray
    sample_rate: int
    input_lufs: float
    input_true_peak_dbtp: float
    dc_offset: tuple[float, ...]
    gain_db: float
    limiter_max_reduction_db: float
    output_lufs: float
    output_true_peak_dbtp: float
    target_lufs: float | None
    ceiling_dbtp: float
    margin_db: float
    target_reached: bool


def as_audio(samples: Any, *, copy: bool = True) -> np.ndarray:
    """Return ``samples`` as a C-contiguous float32 ``[C, N]`` array (a copy), checked: 2-D (1-D is one
    channel) and finite. ``copy=False``: the checked array as it is (any float dtype), for readers."""
    if hasattr(samples, "detach"):  # a torch tensor, e.g. Waveform.samples
        samples = samples.detach().cpu().numpy()
    audio = np.array(samples, dtype=np.float32, copy=True) if copy else np.asarray(samples)
    if audio.ndim == 1:
        audio = audio[np.newaxis, :]
    if audio.ndim != 2 or audio.shape[0] < 1:
        raise ValueError(f"audio must be shaped [channels, samples], got shape {audio.shape}")
    if not np.all(np.isfinite(audio)):
        raise ValueError("audio contains NaN or infinite samples")
    return audio


def db_to_gain(db: float) -> float:
    """Convert decibels to a linear amplitude factor."""
    return 10.0 ** (db / 20.0)


def gain_to_db(gain: float) -> float:
    """Convert a linear amplitude factor to decibels (``-inf`` for 0)."""
    return 20.0 * math.log10(gain) if gain > 0 else SILENCE_DB


def _check_level(name: str, value: float | None, *, allow_none: bool) -> None:
    if value is None:
        if not allow_none:
            raise SettingsError(f"{name} must be a number")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SettingsError(f"{name} must be a finite number, got {value!r}")


def remove_dc(
    samples: Any,
    sample_rate: int,
    *,
    cutoff_hz: float = DC_HIGHPASS_HZ,
    circular: bool = False,
) -> np.ndarray:
    """Remove DC offset and sub-audio drift.

    Subtracts each channel's mean (a constant offset then costs the filter
    nothing), then applies a zero-phase Butterworth high-pass
    (:data:`DC_HIGHPASS_ORDER` per direction) at ``cutoff_hz``. Zero phase keeps
    transients where they were, which matters for the loop seam and the limiter.

    Args:
        samples: ``[C, N]`` audio (float, full scale 1.0).
        sample_rate: Hz.
        cutoff_hz: high-pass corner, Hz.
        circular: treat the audio as a loop (end joined to start) so the filter
            adds no seam; otherwise the edges are padded by odd reflection.

    Returns:
        float32 ``[C, N]``.
    """
    from scipy.signal import butter, sosfiltfilt

    audio = as_audio(samples)
    audio -= audio.mean(axis=1, keepdims=True, dtype=np.float64).astype(np.float32)
    n = audio.shape[1]
    if not 0 < cutoff_hz < sample_rate / 2:
        raise SettingsError(f"DC high-pass cutoff {cutoff_hz} Hz must be between 0 and {sample_rate / 2} Hz")
    sos = butter(DC_HIGHPASS_ORDER, cutoff_hz, btype="highpass", fs=sample_rate, output="sos")
    # about five time constants of the corner frequency settle the filter
    pad = int(5 * sample_rate / cutoff_hz)
    if circular:
        wrapped = np.pad(audio, ((0, 0), (pad, pad)), mode="wrap")
        out = sosfiltfilt(sos, wrapped, axis=1, padlen=0)[:, pad : pad + n]
    else:
        out = sosfiltfilt(sos, audio, axis=1, padlen=min(pad, n - 1))
    return np.ascontiguousarray(out, dtype=np.float32)


def measure_loudness(samples: Any, sample_rate: int) -> float:
    """Integrated loudness per ITU-R BS.1770-4, in LUFS: pyloudnorm's meter, vectorised.

    pyloudnorm is the definition (its K-weighting filters, its 400 ms blocks with
    75 % overlap and block boundaries, its absolute and relative gates and
    channel weights); this runs the same steps as whole-array operations (the
    filters as one second-order-section pass over all channels, each block's
    energy from a cumulative sum) instead of its Python loop over blocks, which
    takes most of its time: about 3x faster on a 90 s track. Tests hold it to
    ``pyloudnorm.Meter.integrated_loudness`` within 1e-6 LU.

    Args:
        samples: ``[C, N]`` audio; up to 5 channels (BS.1770 weights).
        sample_rate: Hz.

    Returns:
        LUFS; ``-inf`` for silence (everything below the absolute gate). Audio
        shorter than one 400 ms gating block is measured as if padded with silence.
    """
    return _LoudnessBlocks.measure(samples, sample_rate).lufs


@dataclass(frozen=True)
class _LoudnessBlocks:
    """The K-weighted energy of audio at its gating blocks' bounds: enough to give its loudness, and that
    of the same audio changed in a few places (:meth:`changed`) without filtering all of it again.

    Attributes:
        sos: the K-weighting filters as second-order sections (pyloudnorm's, gains folded in).
        lower, upper: each block's first and past-last sample (pyloudnorm's bounds).
        bounds: the sorted distinct values of ``lower`` and ``upper``.
        energy: ``[C, len(bounds)]`` running sum of the squared K-weighted signal up to each bound.
        length: samples measured (after padding a short track).
        sample_rate: Hz.
        block_samples: samples per block (``0.4 s * rate``, as pyloudnorm divides by).
    """

    sos: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    bounds: np.ndarray
    energy: np.ndarray
    length: int
    sample_rate: int
    block_samples: float

    @classmethod
    def measure(cls, samples: Any, sample_rate: int) -> "_LoudnessBlocks":
        import pyloudnorm
        from scipy.signal import sosfilt

        audio = as_audio(samples, copy=False)  # read only; the filter makes its own float64 copy
        channels = audio.shape[0]
        if channels > len(_BS1770_CHANNEL_WEIGHTS):
            raise ValueError(f"loudness is defined for at most {len(_BS1770_CHANNEL_WEIGHTS)} channels, got {channels}")
        min_len = int(math.ceil(MIN_LOUDNESS_BLOCK_S * sample_rate)) + 1
        if audio.shape[1] < min_len:
            audio = np.pad(audio, ((0, 0), (0, min_len - audio.shape[1])))
        meter = pyloudnorm.Meter(sample_rate)
        sos = np.array([[*(f.passband_gain * f.b), *f.a] for f in meter._filters.values()])
        block, step = meter.block_size, 1.0 - meter.overlap
        n = audio.shape[1]
        count = int(np.round((n / sample_rate - block) / (block * step))) + 1
        j = np.arange(count)
        lower = (block * (j * step) * sample_rate).astype(np.int64)  # pyloudnorm's bounds, in the same float steps
        upper = np.minimum((block * (j * step + 1) * sample_rate).astype(np.int64), n)
        bounds = np.union1d(lower, upper)

        # The filters and the running sum go through the track a piece at a time, each piece starting from
        # the state the last one left (the same operations in the same order as one whole-track pass), so
        # the float64 working arrays are a piece long: a 600 s stereo track would need 1.3 GB at once.
        energy = np.zeros((channels, bounds.size))
        state = np.zeros((sos.shape[0], channels, 2))
        total = np.zeros((channels, 1))
        for start in range(0, n, _LOUDNESS_PIECE):
            stop = min(n, start + _LOUDNESS_PIECE)
            weighted, state = sosfilt(sos, audio[:, start:stop].astype(np.float64), axis=1, zi=state)
            running = np.cumsum(np.concatenate((total, np.square(weighted, out=weighted)), axis=1), axis=1)
            inside = (bounds >= start) & (bounds <= stop)
            energy[:, inside] = running[:, bounds[inside] - start]
            total = running[:, -1:]
        return cls(sos, lower, upper, bounds, energy, n, sample_rate, block * sample_rate)

    @property
    def lufs(self) -> float:
        """Gated integrated loudness, LUFS (``-inf`` for silence)."""
        at = np.searchsorted(self.bounds, self.lower), np.searchsorted(self.bounds, self.upper)
        z = (self.energy[:, at[1]] - self.energy[:, at[0]]) / self.block_samples  # [C, blocks] mean squares
        channels = self.energy.shape[0]
        weights = np.array(_BS1770_CHANNEL_WEIGHTS[:channels])[:, np.newaxis]
        with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the mean of no block: silence, -inf below
            block_lufs = -0.691 + 10.0 * np.log10(np.sum(weights * z, axis=0))
            above_absolute = block_lufs >= _BS1770_ABSOLUTE_GATE_LUFS
            relative_gate = -0.691 + 10.0 * np.log10(np.sum(weights * z[:, above_absolute].mean(axis=1, keepdims=True))) - 10.0
            gated = (block_lufs > relative_gate) & (block_lufs > _BS1770_ABSOLUTE_GATE_LUFS)
            lufs = float(-0.691 + 10.0 * np.log10(np.sum(weights * np.nan_to_num(z[:, gated].mean(axis=1, keepdims=True)))))
        return lufs if math.isfinite(lufs) else SILENCE_DB

    def settle_samples(self) -> int:
        """Samples after which the K-weighting filters have forgotten a change: e^-60 of it (their slowest
        pole; the double pole's t·r^t factor still leaves it far below float64 rounding)."""
        radius = max(float(np.abs(np.roots(section[3:])).max()) for section in self.sos)
        return int(math.ceil(60.0 / -math.log(radius))) if radius < 1.0 else self.length

    def changed(
        self, scale: float, before: np.ndarray, after: np.ndarray, runs: list[tuple[int, int]], *,
        before_factor: float | None = None,
    ) -> "_LoudnessBlocks":  # fmt: skip
        """These blocks' energies for ``after``, where ``before`` is this audio times ``scale`` and ``after``
        differs from ``before`` only inside ``runs`` (``[(start, stop), ...]``, sorted, in ``[0, N)``).
        With ``before_factor``, ``before`` is given unscaled and each stretch is scaled by it as needed
        (the float32 products, exactly the values of the scaled audio).

        The K-weighting is linear: the filtered ``after`` is the filtered ``before`` plus the filtered
        difference, which is zero before a run starts and has died away
        :meth:`settle_samples` after it ends. So only the runs (and that much after each) are filtered
        again, the filtered ``before`` there starting :meth:`settle_samples` earlier from rest; the
        energies move by the sums of ``(b + d)^2 - b^2`` up to each bound.
        """
        from scipy.signal import sosfilt

        settle = self.settle_samples()
        n = after.shape[1]
        energy = self.energy * (scale * scale)
        merged: list[list[int]] = []
        for a, e in runs:
            if merged and a < merged[-1][1] + settle:  # the earlier run's change still rings here
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([a, e])
        for a, e in merged:
            stop = min(n, e + settle)
            lead = max(0, a - settle)
            scaled = before[:, lead:stop] if before_factor is None else before[:, lead:stop] * np.float32(before_factor)
            diff = sosfilt(self.sos, (after[:, a:stop].astype(np.float64) - scaled[:, a - lead :]), axis=1)
            base = sosfilt(self.sos, scaled.astype(np.float64), axis=1)[:, a - lead :]
            extra = np.zeros((diff.shape[0], diff.shape[1] + 1))
            np.cumsum(diff * (2.0 * base + diff), axis=1, out=extra[:, 1:])
            at = np.clip(self.bounds - a, 0, diff.shape[1])
            energy += extra[:, at]
        return dataclasses.replace(self, energy=energy)


@functools.lru_cache(maxsize=4)
def _interpolation_bank(oversample: int) -> np.ndarray:
    """The polyphase bank of the true-peak interpolator: float32 ``[oversample, 2 * taps + 1]``.

    The filter is the one ``scipy.signal.resample_poly(x, oversample, 1)`` designs
    (a Kaiser-windowed sinc, beta 5, :data:`_PEAK_FILTER_SPAN` input samples each
    side); row ``p`` gives the reconstructed signal ``p / oversample`` of a sample
    after each input sample, as a correlation over ``x[n - taps .. n + taps]``.
    """
    from scipy.signal import firwin

    half = _PEAK_FILTER_SPAN * oversample
    h = firwin(2 * half + 1, 1.0 / oversample, window=("kaiser", 5.0)) * oversample
    bank = np.zeros((oversample, 2 * _PEAK_FILTER_SPAN + 1))
    for phase in range(oversample):
        taps = h[phase::oversample]  # tap i weighs x[n + span - i]
        bank[phase, 2 * _PEAK_FILTER_SPAN - np.arange(taps.size)] = taps
    return bank.astype(np.float32)


def peak_envelope(
    samples: Any,
    sample_rate: int | None = None,
    *,
    oversample: int = TRUE_PEAK_OVERSAMPLE,
    circular: bool = False,
) -> np.ndarray:
    """Per-sample true-peak envelope, linked across channels.

    Element ``n`` is the largest magnitude, over all channels, of the signal
    reconstructed (upsampled ``oversample`` x) between sample ``n`` and ``n + 1``,
    including sample ``n`` itself.

    The reconstruction is scipy's ``resample_poly`` filter (:func:`_interpolation_bank`)
    run as one float32 correlation per block through torch, which uses every core:
    about 3x faster than scipy's own polyphase loop on a 90 s track, and within a
    few float32 roundings of it (tests compare the two).

    Args:
        samples: ``[C, N]`` audio.
        sample_rate: unused (the envelope is rate-independent); kept for symmetry.
        oversample: upsampling factor, >= 1.
        circular: the last sample is followed by the first (loop playback).

    Returns:
        float32 ``[N]``, linear magnitude.
    """
    import torch

    del sample_rate
    audio = np.ascontiguousarray(as_audio(samples, copy=False), dtype=np.float32)  # only read
    n = audio.shape[1]
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    if oversample <= 1:
        return np.max(np.abs(audio), axis=0)
    span = _PEAK_FILTER_SPAN
    env = np.empty(n, dtype=np.float32)
    out = torch.from_numpy(env)
    with _no_grad():
        # Block by block, each with its own real neighbours: a few MB of oversampled signal at a time
        # instead of 4 bytes x oversample x N per channel (0.8 GB for 600 s of stereo), and no padded copy.
        for start in range(0, n, _PEAK_SCAN_BLOCK):
            stop = min(n, start + _PEAK_SCAN_BLOCK)
            signal = torch.from_numpy(_with_neighbours(audio, start - span, stop + span, circular))
            out[start:stop] = _reconstructed_peaks(signal, span, span + stop - start, oversample)
    return env


@contextlib.contextmanager
def one_scan_thread() -> Iterator[None]:
    """Run torch's work on one thread inside the block (the true-peak scans), then restore the count.

    Mastering and export run their own work side by side: the loudness meter beside the input's
    true-peak scan, each encoded file's decoder and meter beside the other format's encoder. With
    torch's default pool (one thread per core) every scan wakes a second thread that then spins
    waiting for the next one and takes the core the other work needs: on the 2-core machine the
    meter of a decoded 90 s file took 0.66-0.72 s instead of 0.39 s, and :func:`master` 0.6 s instead
    of 0.43 s (docs/BENCHMARKS.md). Each scan here runs on the core it started on instead.

    ``torch.set_num_threads`` sets the calling thread's count and the one that threads which have not
    used torch yet will take, which is how the threads a stage starts inside the block get one thread
    (tested). A long-lived thread whose first torch work falls inside the block would keep one thread,
    so this belongs around stages that run alone in the process, as mastering and export do (the
    pipeline is sequential, and the threads they start end with them); nested blocks leave the outer
    one's setting alone.
    """
    import torch

    saved = torch.get_num_threads()
    if saved == 1:
        yield
        return
    try:
        torch.set_num_threads(1)
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def _no_grad() -> Iterator[None]:
    """torch's inference mode for the scan. The thread count is left alone here: ``torch.set_num_threads``
    also sets the value every new thread starts with, so the stages that want one scan thread say so
    around their whole run (:func:`one_scan_thread`), not around each scan."""
    import torch

    with torch.inference_mode():
        yield


def _reconstructed_peaks(signal, start: int, stop: int, oversample: int):
    """Per-sample true peak of ``signal`` (a float32 torch ``[C, L]``) at positions ``[start, stop)``.

    The largest of each sample's magnitude and its ``oversample`` reconstructed values up to the next
    sample, over all channels; the neighbours the filter reads must lie inside ``signal``
    (``start >= span``, ``stop <= L - span``).
    """
    import torch

    span = _PEAK_FILTER_SPAN
    bank = torch.from_numpy(_interpolation_bank(oversample)).unsqueeze(1)
    up = torch.nn.functional.conv1d(signal[:, start - span : stop + span].unsqueeze(1), bank)  # [C, phases, n]
    return torch.maximum(up.abs().amax(dim=(0, 1)), signal[:, start:stop].abs().amax(dim=0))


def _changed_runs(changed: np.ndarray, reach: int, n: int, circular: bool) -> list[tuple[int, int]]:
    """Runs ``[(start, stop), ...]`` (sorted, disjoint, inside ``[0, n)``) covering every sorted index in
    ``changed`` and ``reach`` samples either side of it (wrapping round the ends for a loop)."""
    if changed.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(changed) > 2 * reach + 1) + 1
    runs = [(int(c[0]) - reach, int(c[-1]) + reach + 1) for c in np.split(changed, breaks)]
    pieces: list[tuple[int, int]] = []
    for a, e in runs:
        if circular and e - a >= n:
            return [(0, n)]
        if circular and a < 0:
            pieces += [(a + n, n), (0, e)]
        elif circular and e > n:
            pieces += [(a, n), (0, e - n)]
        else:
            pieces.append((max(a, 0), min(e, n)))
    pieces.sort()
    out: list[tuple[int, int]] = []
    for a, e in pieces:
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        elif e > a:
            out.append((a, e))
    return out


def _with_neighbours(audio: np.ndarray, lo: int, hi: int, circular: bool) -> np.ndarray:
    """``audio[:, lo:hi]`` where ``lo`` or ``hi`` may lie past the ends: silence there, or for a loop the
    other end (a view when both lie inside, otherwise a small copy)."""
    n = audio.shape[1]
    if lo >= 0 and hi <= n:
        return audio[:, lo:hi]
    if circular:
        return audio[:, np.arange(lo, hi) % n]
    out = np.zeros((audio.shape[0], hi - lo), dtype=audio.dtype)
    a, e = max(lo, 0), min(hi, n)
    if e > a:
        out[:, a - lo : e - lo] = audio[:, a:e]
    return out


def _peak_after_change(
    env: np.ndarray, after: np.ndarray, runs: list[tuple[int, int]], *, oversample: int, circular: bool
) -> float:
    """The true peak (linear) of ``after``, whose :func:`peak_envelope` is ``env`` outside ``runs``: each
    run is scanned again, the rest read from ``env``. A sample's reconstruction reads
    :data:`_PEAK_FILTER_SPAN` neighbours each side, so runs that reach that far past every changed sample
    give exactly the full scan's values. Runs are scanned in blocks, as :func:`peak_envelope` scans."""
    import torch

    span = _PEAK_FILTER_SPAN
    keep = np.ones(env.size, dtype=bool)
    peak = 0.0
    with _no_grad():
        for a, e in runs:
            keep[a:e] = False
            for lo in range(a, e, _PEAK_SCAN_BLOCK):
                hi = min(e, lo + _PEAK_SCAN_BLOCK)
                signal = torch.from_numpy(_with_neighbours(after, lo - span, hi + span, circular))
                peak = max(peak, float(_reconstructed_peaks(signal, span, span + hi - lo, oversample).max()))
    return max(peak, float(env.max(where=keep, initial=0.0)))


class TruePeakMeter:
    """The true peak of audio that arrives in pieces (a decoder's output), without holding all of it.

    Fed the pieces of a track in order, :meth:`true_peak_dbtp` is :func:`true_peak` of the whole
    track: every sample is reconstructed from the same neighbours, the track's ends from silence or,
    for a loop (``circular``), from each other across the seam once the end has arrived. So a file can
    be measured while it is being decoded, in a few MB.
    """

    def __init__(self, channels: int, *, oversample: int = TRUE_PEAK_OVERSAMPLE, circular: bool = False):
        span = _PEAK_FILTER_SPAN
        self._channels, self._oversample, self._circular = channels, oversample, circular
        self._peak = 0.0
        self._small: list[np.ndarray] | None = []  # everything, until there is more than a seam's context
        self._head = np.zeros((channels, 0), np.float32)  # a loop's first 2 x span samples: the seam's context
        # the samples whose envelope is still to come, after ``span`` samples of left context
        self._tail = np.zeros((channels, 0 if circular else span), np.float32)
        self._result: float | None = None

    def feed(self, piece: np.ndarray) -> None:
        """Add the next ``[channels, n]`` samples."""
        if self._result is not None:
            raise ValueError("the meter has given its result; feed a new one")
        piece = np.asarray(piece, dtype=np.float32)
        if piece.ndim != 2 or piece.shape[0] != self._channels:
            raise ValueError(f"pieces must be shaped [{self._channels}, n], got {piece.shape}")
        if self._small is not None:
            self._small.append(piece)
            if sum(p.shape[1] for p in self._small) <= 4 * _PEAK_FILTER_SPAN:
                return
            piece, self._small = np.concatenate(self._small, axis=1), None
            if self._circular:  # the first span samples wait for the end, their left neighbours across the seam
                self._head = piece[:, : 2 * _PEAK_FILTER_SPAN].copy()
                self._tail = piece[:, :0]
        self._scan(np.concatenate((self._tail, piece), axis=1), first=_PEAK_FILTER_SPAN)

    def _scan(self, seg: np.ndarray, first: int, right: int | None = None) -> None:
        import torch

        span = _PEAK_FILTER_SPAN
        stop = seg.shape[1] - span if right is None else right
        if stop > first:
            with _no_grad():
                peaks = _reconstructed_peaks(torch.from_numpy(np.ascontiguousarray(seg)), first, stop, self._oversample)
                self._peak = max(self._peak, float(peaks.max()))
        self._tail = seg[:, max(stop, first) - span :]

    def true_peak_dbtp(self) -> float:
        """dBTP of everything fed (``-inf`` for silence or nothing); the meter takes no more pieces after."""
        if self._result is None:
            self._result = self._finish()
        return self._result

    def _finish(self) -> float:
        span = _PEAK_FILTER_SPAN
        if self._small is not None:  # a few samples: the whole-array definition
            whole = np.concatenate(self._small, axis=1) if self._small else np.zeros((self._channels, 0), np.float32)
            return true_peak(whole, oversample=self._oversample, circular=self._circular)
        if self._circular:
            # the last samples, with the first as right neighbours, then the first span samples, with the last
            seg = np.concatenate((self._tail, self._head), axis=1)
            self._scan(seg, first=span, right=self._tail.shape[1] + span)
        else:
            self._scan(np.concatenate((self._tail, np.zeros((self._channels, span), np.float32)), axis=1), first=span)
        return gain_to_db(self._peak) if self._peak > 0 else SILENCE_DB


def true_peak(
    samples: Any,
    sample_rate: int | None = None,
    *,
    oversample: int = TRUE_PEAK_OVERSAMPLE,
    circular: bool = False,
) -> float:
    """True peak in dBTP (largest magnitude of the ``oversample`` x upsampled signal).

    Args:
        samples: ``[C, N]`` audio.
        sample_rate: Hz (not needed for the computation).
        oversample: upsampling factor; 4 meets BS.1770-4 Annex 2.
        circular: include the intersample peak across the loop seam.

    Returns:
        dBTP; ``-inf`` for digital silence.
    """
    env = peak_envelope(samples, sample_rate, oversample=oversample, circular=circular)
    return gain_to_db(float(env.max())) if env.size else SILENCE_DB


def _moving_average(x: np.ndarray, length: int) -> np.ndarray:
    """Causal moving average: ``out[k] = mean(x[k - length + 1 .. k])`` (first samples: shorter window).

    Positive weights summing to 1, so the result never exceeds the window's maximum.
    """
    csum = np.cumsum(np.concatenate(([0.0], x)))
    out = np.empty_like(x)
    out[length - 1 :] = (csum[length:] - csum[:-length]) / length
    head = np.arange(1, min(length - 1, x.size) + 1)
    out[: head.size] = csum[1 : head.size + 1] / head
    return out


def limiter_gain(
    envelope: np.ndarray,
    ceiling: float,
    sample_rate: int,
    *,
    lookahead_s: float = LIMITER_LOOKAHEAD_S,
    release_s: float = LIMITER_RELEASE_S,
    circular: bool = False,
) -> np.ndarray:
    """Gain curve that keeps ``envelope * gain`` at or below ``ceiling``.

    The required reduction (in dB, for every sample over the ceiling and the
    sample after it, which scales the intersample peak between the two) is held
    at its maximum over the look-ahead window, allowed to recover exponentially
    in dB with time constant ``release_s``, and the resulting gain is smoothed
    by two cascaded moving averages that together span the look-ahead window (a
    triangular kernel, so the gain falls along a smooth S-shaped ramp).
    Averaging a curve that is already at or below the requirement over the
    whole window before each peak can only stay at or below it, so the peak is
    honoured while the gain glides down over the look-ahead instead of stepping
    (no clicks, no distortion from the attack).

    Only the stretches a peak reaches are computed: from one look-ahead (and the
    smoothing) before it to :data:`_LIMITER_RELEASE_SPAN` release time constants
    after it, where its reduction has decayed to e^-12 of itself (under 3e-5 dB
    for a 4 dB peak); the gain is exactly 1 elsewhere. The hold is built from the
    peaks themselves, logarithms are taken only where a peak is held, and the
    release is one cumulative maximum and two exponentials per stretch.

    Args:
        envelope: ``[N]`` linear true-peak envelope (see :func:`peak_envelope`).
        ceiling: linear ceiling, > 0.
        sample_rate: Hz.
        lookahead_s: attack / look-ahead time, s.
        release_s: release time constant, s.
        circular: the gain wraps around (loop playback).

    Returns:
        float32 ``[N]`` gain in (0, 1].
    """
    env = np.asarray(envelope)
    n = env.size
    gain = np.ones(n, dtype=np.float32)
    over = np.flatnonzero(env > ceiling)
    if over.size == 0:
        return gain
    look = max(1, int(round(lookahead_s * sample_rate))) | 1  # odd, so the hold window aligns exactly
    release = max(1.0, release_s * sample_rate)
    half = (look + 1) // 2  # each of the two moving averages
    before, after = look - 1 + 2 * half, int(_LIMITER_RELEASE_SPAN * release) + 2 * half

    # reduction needed (dB) at each sample over the ceiling and at the one after it
    need_db = 20.0 * np.log10(env[over].astype(np.float64) / ceiling)
    pos, red = np.concatenate((over, over + 1)), np.concatenate((need_db, need_db))
    if circular:
        # the loop's neighbours: the copies before and after that reach into [0, n)
        pos = np.concatenate((pos, pos - n, pos + n))
        red = np.tile(red, 3)
        keep = (pos >= -after) & (pos < n + before)
    else:
        keep = pos < n
    pos, red = pos[keep], red[keep]
    order = np.argsort(pos, kind="stable")
    pos, red = pos[order], red[order]
    firsts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
    pos, red = pos[firsts], np.maximum.reduceat(red, firsts)

    # stretches: [peak - before, peak + after) merged where they overlap
    breaks = np.flatnonzero(pos[1:] - pos[:-1] > before + after) + 1
    for chunk in np.split(np.arange(pos.size), breaks):
        p, r = pos[chunk], red[chunk]
        start, stop = p[0] - before, p[-1] + after
        curve = _stretch_gain(p - start, r, stop - start, look, release, half)
        lo, hi = max(start, 0), min(stop, n)
        if lo < hi:
            np.minimum(gain[lo:hi], curve[lo - start : hi - start], out=gain[lo:hi])
    return gain


def _stretch_gain(peaks: np.ndarray, reduction_db: np.ndarray, length: int, look: int, release: float, half: int) -> np.ndarray:
    """The limiter's gain over one stretch of ``length`` samples whose peaks (sorted, distinct, at least one
    look-ahead plus the smoothing from its start) need ``reduction_db``; float32, 1 where nothing is reduced."""
    # hold: the largest reduction over [k, k + look - 1], built peak by peak for sparse peaks
    held = np.zeros(length)
    if peaks.size * look <= length:
        for offset in range(look):
            at = peaks - offset
            held[at] = np.maximum(held[at], reduction_db)
    else:
        from scipy.ndimage import maximum_filter1d

        held[peaks] = reduction_db
        held = maximum_filter1d(held, look, origin=-(look // 2), mode="constant", cval=0.0)
    # release: r[k] = max_j<=k held[j] * a^(k-j), so log r[k] = k log a + cummax_j(log held[j] - j log a)
    log_a = -1.0 / release
    idx = np.arange(length, dtype=np.float64)
    marks = np.full(length, -np.inf)
    holding = np.flatnonzero(held)
    marks[holding] = np.log(held[holding]) - holding * log_a
    np.maximum.accumulate(marks, out=marks)
    marks += idx * log_a
    released = np.exp(marks, out=marks)
    curve = np.exp(released * (-math.log(10.0) / 20.0), out=released)  # dB -> linear
    # attack: two causal moving averages of (look+1)/2 samples span exactly the look-ahead window ending at
    # each sample, giving a triangular gain ramp
    smooth = _moving_average(_moving_average(curve, half), half)
    return np.minimum(smooth, 1.0).astype(np.float32)


def limit_true_peak(
    samples: Any,
    sample_rate: int,
    ceiling_dbtp: float,
    *,
    envelope: np.ndarray | None = None,
    lookahead_s: float = LIMITER_LOOKAHEAD_S,
    release_s: float = LIMITER_RELEASE_S,
    circular: bool = False,
) -> tuple[np.ndarray, float, float]:
    """Look-ahead true-peak limiter (stereo-linked).

    Args:
        samples: ``[C, N]`` audio.
        sample_rate: Hz.
        ceiling_dbtp: the true peak of the output will not exceed this, dBTP.
        envelope: ``[N]`` :func:`peak_envelope` of ``samples`` if already known
            (saves one oversampled scan).
        lookahead_s: attack / look-ahead window, s.
        release_s: release time constant, s.
        circular: loop playback (gain and peaks wrap around).

    Returns:
        ``(limited [C, N] float32, max_gain_reduction_db, output_true_peak_dbtp)``. The output's true
        peak is at or below the ceiling: the gain curve is computed on the
        oversampled envelope, and if the gain's own modulation still leaves an
        intersample overshoot, a final static trim removes it.
    """
    audio = as_audio(samples)
    env = envelope if envelope is not None else peak_envelope(audio, circular=circular)
    out, reduction_db, peak_dbtp, _ = _limit(audio, sample_rate, ceiling_dbtp, env, lookahead_s, release_s, circular)
    return out, reduction_db, peak_dbtp


def _limit(
    audio: np.ndarray,
    sample_rate: int,
    ceiling_dbtp: float,
    env: np.ndarray,
    lookahead_s: float,
    release_s: float,
    circular: bool,
    loudness: _LoudnessBlocks | None = None,
    scale: float = 1.0,
) -> tuple[np.ndarray, float, float, float | None]:
    """:func:`limit_true_peak` of ``audio * scale`` (``audio`` float32 ``[C, N]``, only read; ``scale``
    a float32 value) whose envelope is ``env``. The scaled audio is never held beside the output: the
    output is made from it in place, and the stretches the loudness update needs are scaled again.

    ``loudness``, when given, holds the loudness blocks of ``audio``; the integrated loudness of the
    limited audio is then returned as the fourth value, moved by the final static trim if there is one.
    Returns ``(limited, max_gain_reduction_db, true_peak_dbtp, level)``.

    The limiter leaves most samples alone (gain exactly 1): where it changed less than
    :data:`_RESCAN_ALL_ABOVE` of the track, only what it changed is measured again, the true peak
    around each changed stretch (:func:`_peak_after_change`) and the loudness blocks it reaches
    (:meth:`_LoudnessBlocks.changed`); otherwise the whole track is, both at once.
    """
    ceiling = db_to_gain(ceiling_dbtp)
    n = audio.shape[1]
    factor = np.float32(scale)
    out = audio * factor
    if env.size == 0 or env.max() <= ceiling:
        level = None if loudness is None else loudness.changed(scale, out, out, []).lufs
        return out, 0.0, gain_to_db(float(env.max(initial=0.0))), level
    gain = limiter_gain(
        env, ceiling, sample_rate, lookahead_s=lookahead_s, release_s=release_s, circular=circular
    )
    out *= gain[np.newaxis, :]
    level: float | None = None
    changed = np.flatnonzero(gain != 1.0)
    if changed.size <= _RESCAN_ALL_ABOVE * n and (loudness is None or loudness.length == n):
        runs = _changed_runs(changed, _PEAK_FILTER_SPAN, n, circular)
        touched = _changed_runs(changed, 0, n, False) if loudness is not None else []
        del changed
        peak = _peak_after_change(env, out, runs, oversample=TRUE_PEAK_OVERSAMPLE, circular=circular)
        if loudness is not None:
            level = loudness.changed(scale, audio, out, touched, before_factor=factor).lufs
    elif loudness is None:
        peak = float(peak_envelope(out, circular=circular).max())
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tydust-loudness") as pool:
            measured = pool.submit(measure_loudness, out, sample_rate)  # scipy's filter releases the GIL
            peak = float(peak_envelope(out, circular=circular).max())  # the scan runs on torch's threads
            level = measured.result()
    # The gain's own modulation can leave a few hundredths of a dB; trim it statically. A static gain
    # scales the reconstruction as exactly as the samples (it is linear): float32 rounding moves the true
    # peak by at most 2.3 x 2^-24 of itself, far inside the trim's 1e-6 margin, so it needs no second scan.
    if peak > ceiling:
        trim = np.float32(ceiling / peak * (1.0 - 1e-6))
        out *= trim
        gain = gain * trim
        peak *= float(trim)
        if level is not None:
            level += gain_to_db(float(trim))  # every block moves by the same dB (a block at the -70 LUFS gate could flip)
    return out, -gain_to_db(float(gain.min())), gain_to_db(peak), level


@one_scan_thread()  # the loudness meter runs beside the true-peak scan
def master(
    samples: Any,
    sample_rate: int,
    *,
    target_lufs: float | None = DEFAULT_TARGET_LUFS,
    ceiling_dbtp: float = DEFAULT_CEILING_DBTP,
    margin_db: float = 0.0,
    limiter: bool = True,
    max_limiting_db: float = DEFAULT_MAX_LIMITING_DB,
    highpass_hz: float | None = None,
    circular: bool = False,
) -> MasterResult:
    """Normalise loudness to a target and keep true peaks under a ceiling.

    Expects audio whose DC is gone (:func:`remove_dc`, run once, before loop
    folding and fades). Steps: DC removal only if ``highpass_hz`` asks for it;
    measure loudness and true peak;
    apply the static gain that reaches ``target_lufs``; if that pushes the
    true peak above ``ceiling_dbtp - margin_db``, either limit (``limiter``)
    with at most ``max_limiting_db`` of gain reduction, raising the gain in
    small steps to win back the loudness the limiter takes, or (limiter off,
    or limiting capped) settle for the loudest static gain that fits.

    With ``target_lufs=None`` loudness is left alone, but a true peak above the
    ceiling is still brought down by static gain (never raised).

    Args:
        samples: ``[C, N]`` audio (numpy array or torch tensor), full scale 1.0.
        sample_rate: Hz.
        target_lufs: integrated loudness to reach, LUFS; None turns it off.
        ceiling_dbtp: true-peak ceiling of the output, dBTP.
        margin_db: extra headroom below the ceiling, dB (>= 0); the export stage
            raises it when the encoded files overshoot.
        limiter: allow the look-ahead limiter; False means static gain only.
        max_limiting_db: most peak reduction the limiter may apply, dB (>= 0).
        highpass_hz: run :func:`remove_dc` with this corner (Hz) first, for audio
            that has not been through it. None (default): the caller already ran
            it (the pipeline does, before loop folding and fades); a second pass
            would double its low-frequency loss.
        circular: the audio is a seamless loop; filters and limiter wrap around.

    Returns:
        :class:`MasterResult` with the mastered float32 ``[C, N]`` audio.

    Raises:
        SettingsError: a level or margin is not a finite number, or is negative
            where it must not be.
    """
    _check_level("target loudness (LUFS)", target_lufs, allow_none=True)
    _check_level("true-peak ceiling (dBTP)", ceiling_dbtp, allow_none=False)
    _check_level("ceiling margin (dB)", margin_db, allow_none=False)
    _check_level("maximum limiting (dB)", max_limiting_db, allow_none=False)
    if margin_db < 0:
        raise SettingsError(f"ceiling margin must be >= 0 dB, got {margin_db}")
    if max_limiting_db < 0:
        raise SettingsError(f"maximum limiting must be >= 0 dB, got {max_limiting_db}")
    if ceiling_dbtp > 0:
        raise SettingsError(f"true-peak ceiling must be at most 0 dBTP, got {ceiling_dbtp}")
    if target_lufs is not None and not -70.0 <= target_lufs <= 0.0:
        raise SettingsError(f"target loudness must be between -70 and 0 LUFS, got {target_lufs}")

    raw = np.ascontiguousarray(as_audio(samples, copy=False), dtype=np.float32)  # only read: outputs are new arrays
    dc = tuple(float(v) for v in raw.mean(axis=1, dtype=np.float64))
    if highpass_hz is None:
        # Not even the mean: after fades it is no longer the DC offset, and subtracting
        # it would lift the fades' exact zero ends.
        audio = raw
    else:
        audio = remove_dc(raw, sample_rate, cutoff_hz=highpass_hz, circular=circular)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tydust-loudness") as pool:
        blocks = pool.submit(_LoudnessBlocks.measure, audio, sample_rate)  # while the true peak is scanned
        in_env = peak_envelope(audio, circular=circular)
        in_blocks = blocks.result()
    in_lufs = in_blocks.lufs
    in_tp = gain_to_db(float(in_env.max(initial=0.0)))
    limit_db = ceiling_dbtp - margin_db

    def done(
        out: np.ndarray, gain_db: float, reduction_db: float,
        out_lufs: float | None = None, out_tp: float | None = None,
    ) -> MasterResult:  # fmt: skip
        if out_lufs is None:  # static gain: loudness and peak move by exactly gain_db
            out_lufs = in_lufs + gain_db
        if out_tp is None:  # a static gain scales the reconstructed signal, so its peak too
            out_tp = in_tp + gain_db
        reached = target_lufs is None or abs(out_lufs - target_lufs) <= LOUDNESS_TOLERANCE_LU + 0.1
        return MasterResult(
            samples=np.ascontiguousarray(out, dtype=np.float32),
            sample_rate=sample_rate,
            input_lufs=in_lufs,
            input_true_peak_dbtp=in_tp,
            dc_offset=dc,
            gain_db=gain_db,
            limiter_max_reduction_db=reduction_db,
            output_lufs=out_lufs,
            output_true_peak_dbtp=out_tp,
            target_lufs=target_lufs,
            ceiling_dbtp=ceiling_dbtp,
            margin_db=margin_db,
            target_reached=reached,
        )

    if not math.isfinite(in_tp):  # digital silence: nothing to normalise
        return done(audio.copy(), 0.0, 0.0)

    if target_lufs is None or not math.isfinite(in_lufs):
        # loudness off (or below the gate): only keep the peaks under the ceiling
        gain_db = min(0.0, limit_db - in_tp - _STATIC_FIT_GUARD_DB)
        return done(audio * np.float32(db_to_gain(gain_db)), gain_db, 0.0)

    gain_db = target_lufs - in_lufs
    if in_tp + gain_db <= limit_db:
        return done(audio * np.float32(db_to_gain(gain_db)), gain_db, 0.0)

    # loudest gain with no limiting at all; the hair below keeps float32 rounding under the ceiling
    static_fit_db = limit_db - in_tp - _STATIC_FIT_GUARD_DB
    if not limiter or max_limiting_db == 0:
        return done(audio * np.float32(db_to_gain(static_fit_db)), static_fit_db, 0.0)

    # The limiter pulls the highest peak down by exactly (in_tp + gain - limit),
    # so capping the gain caps the reduction. Each pass loses some loudness to
    # the limiter; the shortfall is added to the gain and the pass repeated.
    max_gain_db = static_fit_db + max_limiting_db
    gain_db = min(gain_db, max_gain_db)
    best: tuple[float, np.ndarray, float, float, float] | None = None
    for _ in range(LIMITER_MAX_PASSES):
        g = db_to_gain(gain_db)
        best = limited = None  # the previous pass's output goes before this pass makes its own
        limited, reduction_db, out_tp, out_lufs = _limit(
            audio, sample_rate, limit_db, in_env * np.float32(g), LIMITER_LOOKAHEAD_S,
            LIMITER_RELEASE_S, circular, loudness=in_blocks, scale=float(np.float32(g)),
        )  # fmt: skip
        best = (gain_db, limited, reduction_db, out_lufs, out_tp)
        shortfall = target_lufs - out_lufs
        if abs(shortfall) <= LOUDNESS_TOLERANCE_LU:
            break
        next_gain = min(gain_db + shortfall, max_gain_db)
        if abs(next_gain - gain_db) < 1e-3:  # capped: settle for the loudness we have
            break
        gain_db = next_gain
    assert best is not None
    gain_db, limited, reduction_db, out_lufs, out_tp = best
    return done(limited, gain_db, reduction_db, out_lufs, out_tp)


def equal_power_curve(length: int, *, rising: bool = True) -> np.ndarray:
    """Quarter-wave equal-power gain curve of exactly ``length`` samples.

    The rising curve is ``sin(pi/2 * k / length)``, starting at exactly 0 and
    reaching ``sin(pi/2 * (length-1)/length)`` on its last sample, so the sample
    after the fade (gain 1) continues it. The falling curve is its mirror image,
    ``cos(pi/2 * (k + 1) / length)``, ending at exactly 0 on the last sample.
    A rising and a falling curve of the same length sum to constant *power*
    (``sin^2 + cos^2 = 1``), which keeps crossfades of unrelated material level.

    Args:
        length: samples, >= 0.
        rising: fade-in (True) or fade-out (False).

    Returns:
        float32 ``[length]``, monotone (strictly in exact arithmetic; float32
        rounds the last few values of a long rising curve to 1.0).
    """
    if length < 0:
        raise ValueError(f"curve length must be >= 0, got {length}")
    rise = np.sin(0.5 * np.pi * np.arange(length, dtype=np.float64) / max(length, 1))
    # the falling curve is the exact mirror, so it ends on a true 0.0
    return (rise if rising else rise[::-1]).astype(np.float32)


def fade_samples(seconds: float, sample_rate: int) -> int:
    """Number of samples of a fade of ``seconds`` (rounded to the nearest sample)."""
    return int(round(seconds * sample_rate))


def apply_fades(
    samples: Any,
    sample_rate: int,
    *,
    fade_in_s: float = 0.0,
    fade_out_s: float = 0.0,
) -> np.ndarray:
    """Apply equal-power fade-in and fade-out envelopes.

    The fade-in covers exactly ``round(fade_in_s * sample_rate)`` samples at
    the start, the fade-out exactly ``round(fade_out_s * sample_rate)`` at the
    end (:func:`equal_power_curve`). Apply after DC removal: fading a signal
    with an offset makes a low thump. Never fade a loop.

    Args:
        samples: ``[C, N]`` audio.
        sample_rate: Hz.
        fade_in_s: seconds, >= 0.
        fade_out_s: seconds, >= 0.

    Returns:
        float32 ``[C, N]``.

    Raises:
        SettingsError: a fade is negative or not finite, or the two fades
            together are longer than the track.
    """
    audio = as_audio(samples)
    n = audio.shape[1]
    for name, value in (("fade-in", fade_in_s), ("fade-out", fade_out_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SettingsError(f"{name} must be a number of seconds, got {value!r}")
        if value < 0:
            raise SettingsError(f"{name} must be 0 s or longer, got {value} s")
    n_in = fade_samples(fade_in_s, sample_rate)
    n_out = fade_samples(fade_out_s, sample_rate)
    if n_in + n_out > n:
        raise SettingsError(
            f"fade-in {fade_in_s} s + fade-out {fade_out_s} s is longer than the track "
            f"({n / sample_rate:.3f} s); shorten the fades"
        )
    if n_in:
        audio[:, :n_in] *= equal_power_curve(n_in, rising=True)
    if n_out:
        audio[:, n - n_out :] *= equal_power_curve(n_out, rising=False)
    return audio


__all__ = [
    "DEFAULT_CEILING_DBTP",
    "DEFAULT_TARGET_LUFS",
    "MasterResult",
    "apply_fades",
    "equal_power_curve",
    "limit_true_peak",
    "master",
    "measure_loudness",
    "peak_envelope",
    "remove_dc",
    "true_peak",
]
