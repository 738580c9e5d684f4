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

**On the bar** (:func:`make_bar_loop`, for music with a clear beat, see
:mod:`tydust_gen.audio.beats`): ``N`` is a whole number of bars at the fitted
tempo (rounded to the nearest sample), the offset ``s`` is searched over the
grid's *downbeats* only, so both loop points fall on downbeats, and the
crossfade lasts a whole number of beats starting on the downbeat, so the two
blended passages are the same bar position with their beats on top of each
other. The crossfade's gains follow the passages' correlation (equal gain for
identical passages, equal power for unrelated ones) so a repeated drum pattern
does not swell by 3 dB mid-fade.

:func:`seam_metric` checks any loop: the sample step across the wrap and the
short-term spectral change across it, each ranked against the same quantity
measured everywhere inside the track, and the beat phase across it: where the
beat grid of the beats before the wrap and that of the beats after it put their
beats, in ms. A loop passes when its seam is no more abrupt than the music's own
ordinary moments and its groove does not stumble.

All audio is numpy float32 ``[C, N]`` (channels, samples). Remove DC
(:func:`tydust_gen.audio.master.remove_dc`) before looping; master the loop with
``circular=True``; never fade it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tydust_gen.audio.beats import CLEAR_BEAT_CONFIDENCE, BeatGrid, detect_beats, onset_envelope, pattern_shift
from tydust_gen.audio.master import as_audio
from tydust_gen.base.errors import SettingsError

DEFAULT_LOOP_CROSSFADE_S = 0.5  # s; long enough to hide a join, short enough not to smear a beat


DEFAULT_LOOP_OVERRUN_S = 3.0  # s; extra audio to generate past the loop length (crossfade + search room)


SEAM_FRAME_S = 0.04  # s; analysis frame for spectral change (20-50 ms: one transient, a few pitch periods)


SEAM_FLOOR_DB = 60.0  # dB below the track's loudest bin; quieter bins count as silence (no flux from hiss)


SEAM_STEP_CONTEXT_S = 0.005  # s each side; the neighbourhood a sample step is judged against


SEAM_STEP_PERCENTILE = 99.9  # %; a natural sample step exceeds this 1 time in 1000, a click far more


SEAM_FLUX_PERCENTILE = 99.0  # %; the spectral change around the wrap may be as large as this share


SEAM_BEAT_WINDOW_BEATS = 4  # beats each side of the wrap whose grids are compared


SEAM_BEAT_TOLERANCE_MS = 20.0  # ms; a beat displaced by more across the wrap is heard as a stumble


SEAM_BEAT_LENGTH_TOLERANCE = 0.05  # of a beat; a loop this much short of a whole bar still holds the bar


SEAM_BEAT_CONTEXT_S = 0.1  # s; audio beyond each window so the onset frames at its edges see real audio


LOOP_LENGTH_SEARCH_S = 0.005  # s; a bar loop's length is refined by up to this much either way...


LOOP_LENGTH_SEARCH_FRACTION = 0.0015  # ...or this share of it (tempo fits are good to ~0.1 %)...


LOOP_LENGTH_SEARCH_MAX_BEATS = 0.0625  # ...but never a 16th note: the search must not reach the next hi-hat


LOOP_SIZING_BPM = 80.0  # bpm; --bars N without a bpm in the prompt file generates enough for this tempo


LOOP_TEMPO_SLACK = 0.1  # the music may come out this much slower than the prompt file's bpm


LOOP_SIZING_EXTRA_S = 1.0  # s; beyond the loop and one bar: the crossfade (at most a bar's worth of beats)


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
        bars: whole bars in the loop (:func:`make_bar_loop`); None for a plain loop.
        crossfade_beats: beats in the crossfade (:func:`make_bar_loop`); None for a plain loop.
    """

    samples: np.ndarray
    sample_rate: int
    loop_start: int
    loop_length: int
    source_offset: int
    crossfade_samples: int
    correlation: float
    bars: int | None = None
    crossfade_beats: int | None = None


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
        beat_phase_ms: how far the beat grid of the :data:`SEAM_BEAT_WINDOW_BEATS`
            beats after the wrap is shifted from the grid of those before it, ms
            (signed, within half a beat; 0 for a groove that runs on); None
            when not judged.
        beat_phase_threshold_ms: the largest shift that passes, ms.
        beat_period_ms: the beat period the grids were laid at, ms (None: no beat).
        beat_judged: both sides of the wrap have a clear beat, so the phase counts.
        passed: ``step_score <= step_threshold and flux <= flux_threshold`` and,
            when judged, ``|beat_phase_ms| <= beat_phase_threshold_ms``.
    """

    step: float
    step_score: float
    step_threshold: float
    step_rank: float
    flux: float
    flux_threshold: float
    flux_rank: float
    beat_phase_ms: float | None
    beat_phase_threshold_ms: float
    beat_period_ms: float | None
    beat_judged: bool
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


def loop_source_length_s(
    duration_s: float,
    *,
    bars: int | None = None,
    beats_per_bar: int = 4,
    bpm_prior: float | None = None,
) -> float:
    """Seconds of audio to generate for a loop, before its tempo is known.

    A plain loop needs ``duration_s`` plus :data:`DEFAULT_LOOP_OVERRUN_S`. A
    loop on the bar may be up to half a bar longer than ``duration_s`` (the
    nearest whole number of bars), or ``bars`` bars, and needs up to one more bar
    to reach its first downbeat plus a crossfade. Bars are sized at the tempo
    the music may have at its slowest: the prompt file's ``bpm`` less
    :data:`LOOP_TEMPO_SLACK`, else :data:`LOOP_SIZING_BPM`.
    """
    slowest = (bpm_prior or LOOP_SIZING_BPM) * (1.0 - LOOP_TEMPO_SLACK)
    bar_s = beats_per_bar * 60.0 / slowest
    loop_s = bars * bar_s if bars else duration_s + bar_s / 2
    return max(duration_s + DEFAULT_LOOP_OVERRUN_S, loop_s + bar_s + LOOP_SIZING_EXTRA_S)


def plain_loop_length_s(duration_s: float, *, bars: int | None = None, beats_per_bar: int = 4, bpm_prior: float | None = None) -> float:
    """Length of the plain loop made when the music has no clear beat, s.

    ``duration_s``; with ``bars``, that many bars at the prompt file's ``bpm``
    (else at :data:`LOOP_SIZING_BPM`), which :func:`loop_source_length_s` made room for.
    """
    if bars:
        return bars * beats_per_bar * 60.0 / (bpm_prior or LOOP_SIZING_BPM)
    return duration_s


def _matched_crossfade(length: int, correlation: float) -> tuple[np.ndarray, np.ndarray]:
    """Gains ``(rise, fall)`` whose mix of two passages with this correlation keeps a constant power.

    With ``p`` a linear ramp, ``rise = p / d`` and ``fall = (1 - p) / d`` with
    ``d = sqrt(p^2 + (1 - p)^2 + 2 r p (1 - p))``, so ``rise^2 + fall^2 + 2 r rise
    fall = 1``: equal gain for ``r = 1``, equal power for ``r = 0``. At the
    first sample ``fall`` is exactly 1 (the wrap is the original flow).
    """
    r = float(np.clip(correlation, 0.0, 1.0))
    p = np.arange(length, dtype=np.float64) / length
    d = np.sqrt(p**2 + (1 - p) ** 2 + 2 * r * p * (1 - p))
    return (p / d).astype(np.float32), ((1 - p) / d).astype(np.float32)


def _ncc_over_lags(head: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Normalised cross-correlation of ``head`` with every ``len(head)``-long window of ``region``."""
    from scipy.signal import correlate

    fade = head.size
    cross = correlate(region, head, mode="valid", method="fft")
    energy = np.sqrt(_window_sums(region * region, fade) * float(np.dot(head, head)))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(energy > 1e-20, cross / np.maximum(energy, 1e-20), 0.0)


def _fits(grid: BeatGrid, total: int, length: int, fade: int) -> np.ndarray:
    """Downbeats (whole samples) where a loop of ``length`` plus its crossfade fits inside ``total`` samples."""
    starts = np.round(grid.downbeats(0, total)).astype(np.int64)
    return starts[(starts >= 0) & (starts + length + fade <= total)]


def make_bar_loop(
    samples: Any,
    sample_rate: int,
    grid: BeatGrid,
    *,
    bars: int | None = None,
    target_length: int | None = None,
    crossfade_s: float = DEFAULT_LOOP_CROSSFADE_S,
) -> LoopResult:
    """A seamless loop of a whole number of bars that starts and wraps on a downbeat.

    The loop is ``bars`` bars of ``grid.bar_period``; with ``bars`` None, the
    whole number of bars nearest to ``target_length`` samples (at least 1),
    fewer when that many do not fit. Its start is the grid downbeat whose
    crossfade passages correlate best, and its length is then refined by at most
    :data:`LOOP_LENGTH_SEARCH_FRACTION` of it (at least :data:`LOOP_LENGTH_SEARCH_S`,
    at most :data:`LOOP_LENGTH_SEARCH_MAX_BEATS` of a beat) to where the music
    repeats best; the loop's own tempo, ``60 * bars * beats_per_bar * sample_rate
    / loop_length``, is that refinement of the grid's. The crossfade is the whole
    number of beats nearest ``crossfade_s`` (1 beat at least, a bar at most),
    from the downbeat on.

    Args:
        samples: ``[C, M]`` audio the grid was detected on, DC removed.
        sample_rate: Hz.
        grid: :func:`tydust_gen.audio.beats.detect_beats` of ``samples`` (``clear``).
        bars: exact number of bars, or None.
        target_length: samples the loop should come near when ``bars`` is None.
        crossfade_s: about how long the crossfade is, s.

    Returns:
        :class:`LoopResult` with ``bars`` and ``crossfade_beats`` set.

    Raises:
        SettingsError: no beat grid, or ``bars`` bars (or even one) do not fit in the audio.
    """
    audio = as_audio(samples)
    total = audio.shape[1]
    if not grid.clear or grid.period is None or grid.bar_period is None:
        raise SettingsError("the music has no clear beat to cut a loop on the bar; loop it by length")
    if bars is not None and (isinstance(bars, bool) or int(bars) != bars or bars < 1):
        raise SettingsError(f"bars must be a whole number of at least 1, got {bars!r}")
    if bars is None and (target_length is None or target_length < 1):
        raise SettingsError("give a number of bars or a target length for the loop")
    period, bar = grid.period, grid.bar_period
    fade_beats = int(min(max(1, round(crossfade_s * sample_rate / period)), grid.beats_per_bar))
    fade = int(round(fade_beats * period))
    bpm = f"{grid.bpm:.1f} bpm"
    if bars is not None:
        count = int(bars)
        length = int(round(count * bar))
        starts = _fits(grid, total, length, fade)
        if starts.size == 0:
            need = (length + bar + fade) / sample_rate
            raise SettingsError(
                f"{count} bar{'s' if count > 1 else ''} at {bpm} need about {need:.1f} s of audio "
                f"(the loop, up to a bar to its first downbeat, a {fade_beats}-beat crossfade); "
                f"there are {total / sample_rate:.1f} s: ask for fewer bars"
            )
    else:
        count = max(1, int(round(target_length / bar)))
        while True:
            length = int(round(count * bar))
            starts = _fits(grid, total, length, fade)
            if starts.size or count == 1:
                break
            count -= 1
        if starts.size == 0:
            raise SettingsError(
                f"not even one bar at {bpm} fits in {total / sample_rate:.1f} s of audio with its crossfade"
            )

    # The grid's tempo is good to a few hundredths of a percent, which over a
    # loop of several bars is still a few ms: enough to blend a bass note with
    # its own inverse. So the length is refined too, within LOOP_LENGTH_SEARCH
    # (never more than a fraction of a beat), to where the continuation after
    # the loop best matches its head: the music's own repetition period.
    reach = int(round(min(max(LOOP_LENGTH_SEARCH_S * sample_rate, LOOP_LENGTH_SEARCH_FRACTION * length),
                          LOOP_LENGTH_SEARCH_MAX_BEATS * period)))  # fmt: skip
    mono = audio.mean(axis=0, dtype=np.float64)
    mono -= mono.mean()
    best, best_length, best_ncc = int(starts[0]), length, -np.inf
    for s in starts:
        lo = max(-reach, -(length - fade))
        hi = min(reach, total - fade - s - length)
        if hi < lo:
            continue
        ncc = _ncc_over_lags(mono[s : s + fade], mono[s + length + lo : s + length + hi + fade])
        i = int(np.argmax(ncc))
        if ncc[i] > best_ncc:
            best, best_length, best_ncc = int(s), length + lo + i, float(ncc[i])
    length = best_length
    window = audio[:, best : best + length].copy()
    continuation = audio[:, best + length : best + length + fade]
    rise, fall = _matched_crossfade(fade, best_ncc)
    window[:, :fade] = window[:, :fade] * rise + continuation * fall
    return LoopResult(
        samples=window,
        sample_rate=sample_rate,
        loop_start=0,
        loop_length=length,
        source_offset=best,
        crossfade_samples=fade,
        correlation=float(best_ncc),
        bars=count,
        crossfade_beats=fade_beats,
    )


@dataclass(frozen=True)
class LoopTake:
    """A take folded into a loop, the way ``--loop`` does it, with what was detected on the way.

    Attributes:
        loop: the loop (``loop.samples`` is what gets mastered).
        grid: the beat grid detected on the take.
        info: figures for the record and ``--json`` (JSON values; see :func:`loop_take`).
        seam_options: keyword arguments for :func:`seam_metric` of this loop (its beat period and meter).
    """

    loop: LoopResult
    grid: BeatGrid
    info: dict[str, Any]
    seam_options: dict[str, Any]


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def loop_take(
    samples: Any,
    sample_rate: int,
    *,
    duration_s: float,
    bars: int | None = None,
    meter: str = "4/4",
    bpm_prior: float | None = None,
    grid: BeatGrid | None = None,
) -> LoopTake:
    """Detect the beat of a take and fold it into a loop: on the bar when the beat is clear, else by length.

    With a clear beat (:func:`tydust_gen.audio.beats.detect_beats`, the prompt
    file's ``bpm`` as prior): :func:`make_bar_loop` of ``bars`` bars, or of the
    whole number of bars nearest ``duration_s``. Without one (ambient music,
    noise): :func:`make_loop` of exactly ``duration_s`` (or ``bars`` bars at
    ``bpm_prior``, see :func:`plain_loop_length_s`), today's behaviour, and
    ``info["mode"]`` says ``"plain"`` with the reason in ``info["note"]``.

    ``info`` keys: ``mode``, ``note``, ``loop_start``, ``loop_length`` (samples),
    ``source_offset``, ``crossfade_samples``, ``crossfade_beats``, ``correlation``,
    ``bars``, ``meter``, ``beats_per_bar``, ``beat_clear``, ``bpm`` (fitted),
    ``loop_bpm`` (the tempo at which the loop is exactly ``bars`` bars),
    ``bpm_prior``, ``tempo_confidence``, ``beat_residual_ms``, ``beats`` (the
    tracked beats inside the loop) and ``downbeats`` (the loop's bar lines:
    ``k * loop_length / bars``), as sample positions in the loop at ``sample_rate``; plus
    ``naive_cut_*``: the seam figures of a hard cut of the same length at the
    take's start, for comparison.

    ``grid``, when given, is the beat grid already detected on ``samples``.

    Raises:
        SettingsError: the loop does not fit in the audio.
    """
    from tydust_gen.base.settings import beats_per_bar as meter_beats

    audio = as_audio(samples)
    bpb = meter_beats(meter)
    if grid is None or grid.beats_per_bar != bpb or grid.sample_rate != sample_rate:
        grid = detect_beats(audio, sample_rate, bpm_prior=bpm_prior, beats_per_bar=bpb)
    info: dict[str, Any] = {"meter": meter, "beats_per_bar": bpb, "bpm_prior": bpm_prior,
                            "tempo_confidence": _round(grid.confidence), "beat_clear": grid.clear}  # fmt: skip
    if grid.clear:
        loop = make_bar_loop(audio, sample_rate, grid, bars=bars, target_length=int(round(duration_s * sample_rate)))
        assert loop.bars is not None and grid.period is not None
        start, n = loop.source_offset, loop.loop_length
        beats = [b - start for b in grid.beats if start <= b < start + n]
        info.update(mode="bars", bpm=_round(grid.bpm, 3), loop_bpm=_round(60.0 * loop.bars * bpb * sample_rate / n, 3),
                    bars=loop.bars, beat_residual_ms=_round(grid.residual_ms, 2), beats=beats,
                    downbeats=[int(round(k * n / loop.bars)) for k in range(loop.bars)],
                    note=f"{loop.bars} bar{'s' if loop.bars > 1 else ''} of {meter} at {grid.bpm:.1f} bpm, "
                         f"cut on the downbeat")  # fmt: skip
        seam_options = {"beat_period_s": n / (loop.bars * bpb) / sample_rate, "beats_per_bar": bpb}
    else:
        length_s = plain_loop_length_s(duration_s, bars=bars, beats_per_bar=bpb, bpm_prior=bpm_prior)
        loop = make_loop(audio, sample_rate, loop_length_samples(length_s, sample_rate))
        why = "silence" if grid.bpm is None else f"tempo confidence {grid.confidence:.2f} < {CLEAR_BEAT_CONFIDENCE:g}"
        info.update(mode="plain", bpm=None, loop_bpm=None, bars=None, beat_residual_ms=None, beats=[], downbeats=[],
                    note=f"no clear beat ({why}): a loop of exactly {loop.loop_length / sample_rate:.2f} s, "
                         f"not cut on bars")  # fmt: skip
        seam_options = {"beats_per_bar": bpb}
    info.update(loop_start=int(loop.loop_start), loop_length=int(loop.loop_length), source_offset=int(loop.source_offset),
                crossfade_samples=int(loop.crossfade_samples), crossfade_beats=loop.crossfade_beats,
                correlation=_round(loop.correlation))  # fmt: skip
    # The same audio cut hard at the same length, for comparison: what the loop folding saves.
    naive = seam_metric(naive_loop(audio, loop.loop_length), sample_rate, **seam_options)
    info.update({f"naive_cut_{k}": v if isinstance(v, (bool, type(None))) else _round(v) for k, v in naive.__dict__.items()})
    return LoopTake(loop, grid, info, seam_options)


def loop_summary(info: dict[str, Any]) -> str:
    """One line saying what the loop is: its bars and tempo (or why it is not on the bar), its points and seam."""
    verdict = "seamless" if info.get("seam_passed") else "audible seam"
    phase = info.get("seam_beat_phase_ms")
    if phase is not None:
        verdict += f", beat phase {phase:+.1f} ms"
    points = f"LOOPSTART={info['loop_start']} LOOPLENGTH={info['loop_length']}"
    if info.get("mode") == "bars":
        what = f"{info['note']} (tempo confidence {info['tempo_confidence']:.2f})"
    else:
        what = info.get("note", "")
    return f"loop: {what}; {points} ({verdict})"


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


def beat_phase_jump(
    samples: Any,
    sample_rate: int,
    beat_period_s: float,
    *,
    beats_per_bar: int = 4,
    window_beats: int = SEAM_BEAT_WINDOW_BEATS,
) -> tuple[float | None, float, float]:
    """How far the beat grid jumps across the wrap ``x[N-1] -> x[0]`` of a loop.

    Takes the onset envelope of the looped signal around the wrap, folds the
    ``window_beats`` beats before the wrap and those after it onto one beat of
    period ``beat_period_s`` each, and returns how far the pattern after the
    wrap is shifted from the pattern before it
    (:func:`tydust_gen.audio.beats.pattern_shift`): 0 when the groove runs on,
    half a beat when the wrap drops or adds half a beat.

    Windows are rounded up to whole bars (of ``beats_per_bar``), so both hold
    the same beats of the bar: a pattern that differs from beat to beat (a
    syncopated figure repeating every two beats, a kick on 1 and a snare on 2
    peaking at different delays) would otherwise look shifted in seamless
    music (measured on a recorded house loop: windows of two or three beats
    were sometimes half a beat out, windows of a bar were not). In a loop
    shorter than two windows the windows overlap: they are two views of the
    looped signal on one time axis through the wrap, so the jump is still
    measured. A loop shorter than one bar is not judged.

    Returns:
        ``(jump_ms, coherence_before, coherence_after)``: the shift of the grid
        after the wrap relative to the grid before it, ms, in ``[-T/2, T/2)``
        (None when the loop is shorter than a bar); and how
        clearly each side shows a beat of that period (variance share on the
        beat, 0..1, as :func:`tydust_gen.audio.beats.beat_periodicity`).
    """
    audio = as_audio(samples)
    n = audio.shape[1]
    period = beat_period_s * sample_rate
    bar_beats = max(int(beats_per_bar), 1)
    beats = math.ceil(window_beats / bar_beats) * bar_beats
    # whole bars each side, as many as the loop holds (one refined a few ms short of its bars still counts them)
    room = math.floor(n / period + SEAM_BEAT_LENGTH_TOLERANCE)
    beats = min(beats, room // bar_beats * bar_beats)
    if beats < 1:
        return None, 0.0, 0.0
    side = int(round(beats * period))
    margin = int(round(SEAM_BEAT_CONTEXT_S * sample_rate))
    index = np.arange(-(side + margin), side + margin) % n
    env, frame_rate = onset_envelope(audio[:, index], sample_rate)
    t = np.arange(env.size) / frame_rate - (side + margin) / sample_rate  # seconds from the wrap
    before = (t >= -side / sample_rate) & (t < 0)
    after = (t >= 0) & (t < side / sample_rate)
    jump, share_before, share_after = pattern_shift(env[before], t[before], env[after], t[after], beat_period_s)
    return jump * 1000.0, share_before, share_after


def seam_metric(
    samples: Any,
    sample_rate: int,
    *,
    frame_s: float = SEAM_FRAME_S,
    step_percentile: float = SEAM_STEP_PERCENTILE,
    flux_percentile: float = SEAM_FLUX_PERCENTILE,
    beat_period_s: float | None = None,
    beats_per_bar: int = 4,
    beat_tolerance_ms: float = SEAM_BEAT_TOLERANCE_MS,
) -> SeamReport:
    """Rank the abruptness of the wrap ``x[N-1] -> x[0]`` against the track itself, and check its groove.

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

    And one against an absolute tolerance: the beat phase across the wrap
    (:func:`beat_phase_jump`), judged when both sides have a clear beat and the
    loop holds at least one bar. A loop
    half a beat too long or too short is smooth sample-wise and spectrally, yet
    the groove stumbles at every repeat; only this measure sees it.

    Args:
        samples: ``[C, N]`` loop (at least a few frames long).
        sample_rate: Hz.
        frame_s: analysis frame length, s (20-50 ms is the useful range).
        step_percentile: the wrap step passes up to this percentile, %.
        flux_percentile: the wrap flux passes up to this percentile, %.
        beat_period_s: the music's beat period, s; None: detect it on the loop
            (:func:`tydust_gen.audio.beats.detect_beats`; no clear beat: the
            beat phase is not judged).
        beats_per_bar: beats in a bar (the beat-phase windows are whole bars).
        beat_tolerance_ms: the largest beat-phase jump that passes, ms.

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

    if beat_period_s is None:
        grid = detect_beats(audio, sample_rate, beats_per_bar=beats_per_bar)
        beat_period_s = grid.period / sample_rate if grid.clear and grid.period else None
    jump_ms, judged = None, False
    if beat_period_s:
        jump_ms, before, after = beat_phase_jump(audio, sample_rate, beat_period_s, beats_per_bar=beats_per_bar)
        judged = jump_ms is not None and min(before, after) >= CLEAR_BEAT_CONFIDENCE
    step_ok = step_score <= step_threshold
    flux_ok = flux <= flux_threshold
    beat_ok = not judged or abs(jump_ms) <= beat_tolerance_ms

    return SeamReport(
        step=step,
        step_score=step_score,
        step_threshold=step_threshold,
        step_rank=_percentile_rank(inner_scores, step_score),
        flux=flux,
        flux_threshold=flux_threshold,
        flux_rank=_percentile_rank(flux_inner2, flux),
        beat_phase_ms=jump_ms if judged else None,
        beat_phase_threshold_ms=float(beat_tolerance_ms),
        beat_period_ms=beat_period_s * 1000.0 if beat_period_s else None,
        beat_judged=judged,
        passed=bool(step_ok and flux_ok and beat_ok),
    )


__all__ = [
    "DEFAULT_LOOP_CROSSFADE_S",
    "DEFAULT_LOOP_OVERRUN_S",
    "LoopResult",
    "LoopTake",
    "SeamReport",
    "beat_phase_jump",
    "loop_length_samples",
    "loop_source_length_s",
    "loop_summary",
    "loop_take",
    "make_bar_loop",
    "make_loop",
    "plain_loop_length_s",
    "naive_loop",
    "seam_metric",
]
