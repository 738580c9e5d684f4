"""Loop stage: seamless loops of an exact length, a seam metric, and OGG loop tags.

Loop mode generates a little more audio than the loop needs (an *overrun* of a
few seconds) and folds the surplus back onto the head:

* The loop is a window ``x[s : s + N]`` of the generated audio, ``N`` the
  requested length in samples. Its last sample ``x[s + N - 1]`` is followed, on
  wrap-around, by the loop's first sample; the audio that *really* followed it
  is ``x[s + N]``, which exists because of the overrun.
* So the first ``F`` samples of the loop are an equal-power crossfade that
  starts as that continuation ``x[s + N + k]`` and ends as the window's own
  head ``x[s + k]``. The wrap itself is then the original, untouched flow of
  the music; the join moves into the crossfade, where two passages are blended.
* The offset ``s`` is searched over the overrun to make the two blended
  passages as alike as possible: it maximises the normalised cross-correlation
  between ``x[s : s + F]`` and ``x[s + N : s + N + F]``, so the crossfade mixes
  near-identical waveforms rather than two bars that disagree.

The result is exactly ``N`` samples; a player loops the whole file
(``LOOPSTART=0``, ``LOOPLENGTH=N``; :func:`write_loop_tags`).

:func:`seam_metric` checks any loop: the sample step across the wrap and the
short-term spectral change across it, each ranked against the same quantity
measured everywhere inside the track. A loop passes when its seam is no more
abrupt than the music's own ordinary moments.

All audio is numpy float32 ``[C, N]`` (channels, samples). Remove DC
(:func:`tydust_gen.audio.master.remove_dc`) before looping; master the loop with
``circular=True``; never fade it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tydust_gen.audio.master import as_audio
from tydust_gen.base.errors import SettingsError

DEFAULT_LOOP_CROSSFADE_S = 0.5  # s; long enough to hide a join, short enough not to smear a beat


DEFAULT_LOOP_OVERRUN_S = 3.0  # s; extra audio to generate past the loop length (crossfade + search room)


SEAM_FRAME_S = 0.04  # s; analysis frame for spectral change (20-50 ms: one transient, a few pitch periods)


SEAM_FLOOR_DB = 60.0  # dB below the track's loudest bin; quieter bins count as silence (no flux from hiss)


SEAM_STEP_CONTEXT_S = 0.005  # s each side; the neighbourhood a sample step is judged against


SEAM_STEP_PERCENTILE = 99.9  # %; a natural sample step exceeds this 1 time in 1000, a click far more


SEAM_FLUX_PERCENTILE = 99.0  # %; the spectral change around the wrap may be as large as this share


_STEP_FLOOR = 1e-5  # full scale; steps of silence (-100 dBFS) do not make every tiny step a "click"


@dataclass(frozen=True)
class LoopResult:
    """A seamless loop cut from longer audio.

    Attributes:
        samples: float32 ``[C, loop_length]``; loops end-to-start without a seam.
        sample_rate: Hz.
        loop_start: first sample of the loop in ``samples`` (always 0 here), samples.
        loop_length: samples in the loop (= ``samples.shape[1]``).
        source_offset: where the loop window starts in the input, samples.
        crossfade_samples: length of the equal-power crossfade at the head, samples.
        correlation: normalised cross-correlation of the two crossfaded
            passages at the chosen offset (1.0: identical waveforms).
    """

    samples: np.ndarray
    sample_rate: int
    loop_start: int
    loop_length: int
    source_offset: int
    crossfade_samples: int
    correlation: float


@dataclass(frozen=True)
class SeamReport:
    """How abrupt a loop's wrap-around is, compared with the inside of the track.

    Attributes:
        step: largest ``|x[c, 0] - x[c, N-1]|`` over channels (full scale 1.0).
        step_score: that step divided by the RMS of the sample steps within
            :data:`SEAM_STEP_CONTEXT_S` either side of it (largest over channels);
            about 1 for ordinary audio, large for a click.
        step_threshold: the :data:`SEAM_STEP_PERCENTILE` percentile of the same
            score at every sample inside the track.
        step_rank: percentage of inside scores smaller than ``step_score`` (0-100).
        flux: log-magnitude spectral change around the wrap, dB (mean absolute
            difference per bin between consecutive frames, the larger of the two
            frame pairs that touch the wrap).
        flux_threshold: the :data:`SEAM_FLUX_PERCENTILE` percentile of the same
            quantity at every frame boundary inside the track, dB.
        flux_rank: percentage of inside values smaller than ``flux`` (0-100).
        passed: ``step_score <= step_threshold and flux <= flux_threshold``.
    """

    step: float
    step_score: float
    step_threshold: float
    step_rank: float
    flux: float
    flux_threshold: float
    flux_rank: float
    passed: bool


def loop_length_samples(loop_s: float, sample_rate: int) -> int:
    """Loop length in samples for ``loop_s`` seconds (nearest sample).

    Raises:
        SettingsError: the length is not a positive finite number of seconds.
    """
    if isinstance(loop_s, bool) or not isinstance(loop_s, (int, float)) or not math.isfinite(loop_s) or loop_s <= 0:
        raise SettingsError(f"loop length must be a positive number of seconds, got {loop_s!r}")
    return int(round(loop_s * sample_rate))


def _window_sums(x: np.ndarray, length: int) -> np.ndarray:
    """``out[s] = sum(x[s : s + length])`` for every full window (float64)."""
    csum = np.concatenate(([0.0], np.cumsum(x, dtype=np.float64)))
    return csum[length:] - csum[:-length]


def make_loop(
    samples: Any,
    sample_rate: int,
    loop_length: int,
    *,
    crossfade_s: float = DEFAULT_LOOP_CROSSFADE_S,
) -> LoopResult:
    """Fold the overrun of longer audio into a seamless loop of exactly ``loop_length`` samples.

    Args:
        samples: ``[C, M]`` audio, ``M >= loop_length + crossfade``; generate
            :data:`DEFAULT_LOOP_OVERRUN_S` more than the loop so the offset
            search has room. DC should already be removed.
        sample_rate: Hz.
        loop_length: samples in the loop (see :func:`loop_length_samples`).
        crossfade_s: equal-power crossfade at the head, s (> 0).

    Returns:
        :class:`LoopResult` with ``loop_start=0`` and ``loop_length`` samples.

    Raises:
        SettingsError: the crossfade is not positive, longer than the loop, or
            the audio has too little overrun for it.
    """
    audio = as_audio(samples)
    total = audio.shape[1]
    if isinstance(loop_length, bool) or int(loop_length) != loop_length or loop_length < 1:
        raise SettingsError(f"loop length must be a positive whole number of samples, got {loop_length!r}")
    n = int(loop_length)
    if isinstance(crossfade_s, bool) or not isinstance(crossfade_s, (int, float)) or not math.isfinite(crossfade_s):
        raise SettingsError(f"loop crossfade must be a number of seconds, got {crossfade_s!r}")
    fade = int(round(crossfade_s * sample_rate))
    if fade < 1:
        raise SettingsError(f"loop crossfade must be longer than 0 s, got {crossfade_s} s")
    if fade > n:
        raise SettingsError(f"loop crossfade {crossfade_s} s is longer than the loop ({n / sample_rate:.3f} s)")
    spare = total - n - fade  # how far the window may slide and still have a continuation to fade
    if spare < 0:
        need_s = (n + fade) / sample_rate
        raise SettingsError(
            f"loop mode needs at least {need_s:.2f} s of audio for a {n / sample_rate:.2f} s loop "
            f"with a {crossfade_s} s crossfade, got {total / sample_rate:.2f} s; generate a longer overrun"
        )

    # Normalised cross-correlation of x[s:s+F] with x[s+N:s+N+F] for every
    # offset s, on the mono mix, in O(M) with running sums.
    mono = audio.mean(axis=0, dtype=np.float64)
    mono -= mono.mean()
    reach = spare + fade  # samples of each sequence the windows cover
    head, tail = mono[:reach], mono[n : n + reach]
    cross = _window_sums(head * tail, fade)
    energy = np.sqrt(_window_sums(head * head, fade) * _window_sums(tail * tail, fade))
    with np.errstate(divide="ignore", invalid="ignore"):
        ncc = np.where(energy > 1e-20, cross / np.maximum(energy, 1e-20), 0.0)
    offset = int(np.argmax(ncc))

    window = audio[:, offset : offset + n].copy()
    continuation = audio[:, offset + n : offset + n + fade]
    # same phase for both curves: sin^2 + cos^2 = 1 (equal power), and at k = 0
    # the continuation has gain exactly 1, so the wrap is the original flow
    phase = 0.5 * np.pi * np.arange(fade, dtype=np.float64) / fade
    rise = np.sin(phase).astype(np.float32)
    fall = np.cos(phase).astype(np.float32)
    window[:, :fade] = window[:, :fade] * rise + continuation * fall
    return LoopResult(
        samples=window,
        sample_rate=sample_rate,
        loop_start=0,
        loop_length=n,
        source_offset=offset,
        crossfade_samples=fade,
        correlation=float(ncc[offset]),
    )


def naive_loop(samples: Any, loop_length: int) -> np.ndarray:
    """The first ``loop_length`` samples, hard-cut: the baseline a seam metric must reject."""
    audio = as_audio(samples)
    return audio[:, :loop_length].copy()


def _log_spectra(mono: np.ndarray, frame: int, hop: int, floor_ref: float | None) -> tuple[np.ndarray, float]:
    """Hann-windowed log-magnitude spectra (dB) of consecutive frames, ``[frames, bins]``."""
    from numpy.lib.stride_tricks import sliding_window_view

    frames = sliding_window_view(mono, frame)[::hop]
    spec = np.abs(np.fft.rfft(frames * np.hanning(frame), axis=1))
    ref = float(spec.max()) if floor_ref is None else floor_ref
    floor = max(ref, 1e-12) * 10.0 ** (-SEAM_FLOOR_DB / 20.0)
    return 20.0 * np.log10(np.maximum(spec, floor)), ref


def _step_scores(steps: np.ndarray, context: int) -> np.ndarray:
    """``|d[i]| / rms(d[i-context:i] and d[i+1:i+1+context])`` per channel, ``[C, len - 2*context]``.

    Judging a step against its own neighbourhood, not the whole track, makes a
    click in a quiet passage count as much as it is heard, and a hi-hat's
    large but ordinary steps not mask it.
    """
    sq = np.concatenate((np.zeros((steps.shape[0], 1)), np.cumsum(steps.astype(np.float64) ** 2, axis=1)), axis=1)
    length = steps.shape[1]
    i = np.arange(context, length - context)
    before = sq[:, i] - sq[:, i - context]
    after = sq[:, i + 1 + context] - sq[:, i + 1]
    rms = np.sqrt((before + after) / (2 * context) + _STEP_FLOOR**2)
    return np.abs(steps[:, i]) / rms


def _percentile_rank(values: np.ndarray, x: float) -> float:
    return float(100.0 * np.count_nonzero(values < x) / max(values.size, 1))


def seam_metric(
    samples: Any,
    sample_rate: int,
    *,
    frame_s: float = SEAM_FRAME_S,
    step_percentile: float = SEAM_STEP_PERCENTILE,
    flux_percentile: float = SEAM_FLUX_PERCENTILE,
) -> SeamReport:
    """Rank the abruptness of the wrap ``x[N-1] -> x[0]`` against the track itself.

    Two measures, each compared with its own distribution inside the track:

    * the sample step ``|x[c, 0] - x[c, N-1]|``, divided by the RMS of the
      steps in the :data:`SEAM_STEP_CONTEXT_S` either side of it, versus the
      same score of every ``|x[c, n+1] - x[c, n]|`` inside the track (a click
      is a step its neighbourhood never makes; a raw step alone would be
      masked by the large but ordinary steps of noisy passages such as hi-hats);
    * the log-magnitude spectral flux (mean absolute dB change per bin) of the
      mono mix between Hann frames of ``frame_s`` at half-frame hops, taking the
      larger of the two frame pairs around the wrap (frame ending at the wrap →
      frame centred on it → frame starting at it), versus the same two-pair
      maximum at every frame boundary inside the track. A sudden change of
      harmony, timbre or level shows here even when the samples happen to line up.

    Args:
        samples: ``[C, N]`` loop (at least a few frames long).
        sample_rate: Hz.
        frame_s: analysis frame length, s (20-50 ms is the useful range).
        step_percentile: the wrap step passes up to this percentile, %.
        flux_percentile: the wrap flux passes up to this percentile, %.

    Returns:
        :class:`SeamReport`.
    """
    audio = as_audio(samples)
    n = audio.shape[1]
    frame = max(8, int(round(frame_s * sample_rate)))
    frame += frame % 2
    hop = frame // 2
    if n < 4 * frame:
        raise ValueError(f"seam metric needs at least {4 * frame} samples, got {n}")

    context = max(2, int(round(SEAM_STEP_CONTEXT_S * sample_rate)))
    steps = np.diff(audio, axis=1)
    inner_scores = np.max(_step_scores(steps, context), axis=0)
    # steps of the looped signal around the wrap, the wrap step in the middle
    around_steps = np.concatenate((steps[:, -context:], audio[:, :1] - audio[:, -1:], steps[:, :context]), axis=1)
    step_score = float(np.max(_step_scores(around_steps, context)))
    step = float(np.max(np.abs(audio[:, 0] - audio[:, -1])))
    step_threshold = float(np.percentile(inner_scores, step_percentile))

    mono = audio.mean(axis=0, dtype=np.float64)
    inner, ref = _log_spectra(mono, frame, hop, None)
    flux_inner = np.mean(np.abs(np.diff(inner, axis=0)), axis=1)
    flux_inner2 = np.maximum(flux_inner[:-1], flux_inner[1:])  # two pairs per boundary, as at the wrap
    # frames [N-F, N), [N-F/2, N+F/2), [N, N+F) of the looped signal
    around = np.concatenate((mono[n - frame :], mono[:frame]))
    wrap_spec, _ = _log_spectra(around, frame, hop, ref)
    flux = float(np.max(np.mean(np.abs(np.diff(wrap_spec, axis=0)), axis=1)))
    flux_threshold = float(np.percentile(flux_inner2, flux_percentile))

    return SeamReport(
        step=step,
        step_score=step_score,
        step_threshold=step_threshold,
        step_rank=_percentile_rank(inner_scores, step_score),
        flux=flux,
        flux_threshold=flux_threshold,
        flux_rank=_percentile_rank(flux_inner2, flux),
        passed=step_score <= step_threshold and flux <= flux_threshold,
    )


__all__ = [
    "DEFAULT_LOOP_CROSSFADE_S",
    "DEFAULT_LOOP_OVERRUN_S",
    "LoopResult",
    "SeamReport",
    "loop_length_samples",
    "make_loop",
    "naive_loop",
    "seam_metric",
]
