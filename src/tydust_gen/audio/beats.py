"""Beat stage: tempo, beat grid and downbeats of audio, for loops cut on the bar.

:func:`detect_beats` runs librosa's dynamic-programming beat tracker (Ellis 2007;
no downloaded weights) on a spectral-flux onset envelope of the mono mix, with
the prompt file's ``bpm`` as the tempo prior when there is one, and fits a rigid
grid to what it finds:

* **Tempo.** librosa estimates the tempo from the onset envelope's
  autocorrelation (log-normal prior around ``bpm_prior``, else 120 bpm) and
  places beats on onset peaks. Each beat is refined to its onset peak (parabolic
  interpolation between envelope frames) and numbered by the beat period; a
  least-squares line through (number, time) gives the period and phase, so the
  tempo is not limited to the autocorrelation's lag grid (a few % at these
  frame rates) but fitted over every beat. Beats more than a quarter beat off
  the line are dropped and the line refitted.
* **Latency.** Spectral flux peaks a little after an attack starts (about
  14 ms here, measured on synthetic drums); the grid is moved earlier by
  :data:`BEAT_LATENCY_S`, a few ms more than that, so a loop that starts on a
  downbeat starts just before its attack, never in it.
* **Downbeats.** The tracker gives beats, not bars. Of the ``beats_per_bar``
  possible bar phases, the downbeat is chosen from three figures per bar
  position, each averaged over the bars and divided by its mean over the
  positions: the onset strength below :data:`LOW_BAND_HZ` (kick drum, bass
  notes), above it (snare, clap, hats), and the change of harmony (chroma)
  across the beat. In an even meter the strong beats are those with more low
  band than high band (a backbeat puts the snare on the weak beats; a
  four-on-the-floor kick is on every beat, so the clap decides); of the strong
  beats (of all beats in an odd meter) the downbeat has the most low-band onset
  plus chroma change, as the bass and the harmony move on the one. It is a
  heuristic: music whose bass enters on beat 3 gets bars that start on beat 3.
  The loop is still a whole number of bars long and its seam still on a beat.
* **Confidence.** How much of the onset envelope repeats with the fitted beat:
  the share of its variance on the first :data:`PATTERN_HARMONICS` harmonics of
  the beat rate (:func:`beat_periodicity`), in windows of
  :data:`CONFIDENCE_WINDOW_BEATS` beats, median over the windows. Measured:
  0.19-0.35 for drum grooves and a recorded house loop, 0.08 for that loop at
  2/3 of its tempo, < 0.02 for pads and for noise. A *clear* beat needs at
  least :data:`CLEAR_BEAT_CONFIDENCE` and :data:`MIN_CLEAR_BEATS` beats;
  otherwise loops keep the plain (not bar-aligned) behaviour. When librosa's
  tempo gives no clear grid, its 2:1 and 3:2 relatives are tracked too and the
  clearest (weighted by the prior) wins: syncopated patterns often repeat at
  2/3 or twice the beat.

Positions are sample indices at the caller's sample rate. librosa is imported
on first use (its beat tracker compiles with numba then: a few seconds, once
per process).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tydust_gen.audio.master import as_audio

ANALYSIS_RATE = 22_050  # Hz; librosa's default analysis rate, enough for onsets
ANALYSIS_HOP = 256  # samples at ANALYSIS_RATE: 11.6 ms onset frames
ANALYSIS_FFT = 1024  # samples at ANALYSIS_RATE: 46 ms STFT window (short: sharp onsets)
DEFAULT_TEMPO_PRIOR_BPM = 120.0  # bpm; librosa's default centre of the tempo prior
PRIOR_SPREAD_GIVEN = 0.5  # octaves; std of the tempo prior around a bpm the prompt file gives
PRIOR_SPREAD_NONE = 1.0  # octaves; std of the tempo prior around the default
MIN_BPM = 40.0  # bpm; slower "beats" are phrases, not a pulse to loop on
MAX_BPM = 240.0  # bpm
BEAT_LATENCY_S = 0.017  # s; onset peaks trail the attack by ~14 ms (measured, synthetic drums), +3 ms: start before it
PEAK_SEARCH_FRAMES = 2  # frames each side of a tracked beat searched for its onset peak
OUTLIER_BEAT_FRACTION = 0.25  # of a beat; tracked beats farther off the fitted line are dropped
LOW_BAND_HZ = 150.0  # Hz; kick drum and bass fundamentals, the downbeat cue
PATTERN_HARMONICS = 4  # multiples of the beat rate that describe a beat's onset pattern (down to 16th notes)
CONFIDENCE_WINDOW_BEATS = 8  # beats per window of the confidence measure (a tempo may drift over a track)
CLEAR_BEAT_CONFIDENCE = 0.1  # variance share on the beat; measured: drums 0.2-0.35, pads and noise < 0.02
TEMPO_AUTOCORRELATION_S = 4.0  # s; window of librosa's tempo estimate (its 8 s default misled it on a 7 s loop)
TEMPO_RATIOS = (2.0, 0.5, 1.5, 2.0 / 3.0)  # tried when librosa's tempo leaves the onsets off the grid
SHIFT_RESOLUTION_S = 0.0002  # s; step of the pattern cross-correlation before interpolation
MIN_CLEAR_BEATS = 8  # beats; fewer cannot establish a tempo and a bar phase
SILENCE_PEAK = 1e-5  # full scale (-100 dBFS); quieter audio has no beat to find


@dataclass(frozen=True)
class BeatGrid:
    """Tempo, beats and bars of some audio.

    Attributes:
        sample_rate: Hz of the positions below.
        clear: the music has a beat steady and strong enough to cut loops on.
        bpm: fitted tempo, beats per minute (None when no beat was found).
        period: samples per beat (float; None when no beat was found).
        origin: position of one downbeat on the fitted grid, samples (float);
            grid beat ``k`` is at ``origin + k * period`` and beats with
            ``k % beats_per_bar == 0`` are downbeats (None when no beat was found).
        beats: tracked beats refined to their onset peaks, latency-corrected,
            samples (ints, ascending, inside the audio).
        beats_per_bar: beats in a bar.
        confidence: share of the onset envelope's variance on the beat grid, 0..1
            (see the module docstring).
        bpm_prior: the tempo the search was centred on, bpm.
        residual_ms: RMS distance of the tracked beats from the fitted grid, ms
            (a steady tempo gives a few ms).
    """

    sample_rate: int
    clear: bool
    bpm: float | None
    period: float | None
    origin: float | None
    beats: tuple[int, ...]
    beats_per_bar: int
    confidence: float
    bpm_prior: float
    residual_ms: float | None = None

    @property
    def bar_period(self) -> float | None:
        """Samples per bar (float)."""
        return None if self.period is None else self.period * self.beats_per_bar

    def grid_beats(self, start: float, stop: float) -> np.ndarray:
        """Grid beat positions in ``[start, stop)``, samples (float)."""
        if self.period is None or self.origin is None:
            return np.zeros(0)
        first = math.ceil((start - self.origin) / self.period)
        last = math.ceil((stop - self.origin) / self.period)
        return self.origin + np.arange(first, last) * self.period

    def downbeats(self, start: float, stop: float) -> np.ndarray:
        """Grid downbeat positions in ``[start, stop)``, samples (float)."""
        bar = self.bar_period
        if bar is None or self.origin is None:
            return np.zeros(0)
        first = math.ceil((start - self.origin) / bar)
        last = math.ceil((stop - self.origin) / bar)
        return self.origin + np.arange(first, last) * bar

    def summary(self) -> dict[str, Any]:
        """The figures a record keeps (positions as ints, at :attr:`sample_rate`)."""
        total = self.beats[-1] + 1 if self.beats else 0
        return {
            "clear": self.clear,
            "bpm": None if self.bpm is None else round(self.bpm, 3),
            "bpm_prior": self.bpm_prior,
            "confidence": round(self.confidence, 4),
            "beats_per_bar": self.beats_per_bar,
            "residual_ms": None if self.residual_ms is None else round(self.residual_ms, 2),
            "beats": list(self.beats),
            "downbeats": [int(round(d)) for d in self.downbeats(0, total)] if self.clear else [],
        }


def _analysis_signal(samples: Any, sample_rate: int) -> np.ndarray:
    """Mono mix at :data:`ANALYSIS_RATE` (float32)."""
    from scipy.signal import resample_poly

    mono = as_audio(samples).mean(axis=0, dtype=np.float64)
    if sample_rate != ANALYSIS_RATE:
        g = math.gcd(int(sample_rate), ANALYSIS_RATE)
        mono = resample_poly(mono, ANALYSIS_RATE // g, int(sample_rate) // g)
    return mono.astype(np.float32)


def onset_envelope(samples: Any, sample_rate: int) -> tuple[np.ndarray, float]:
    """Spectral-flux onset strength of the mono mix.

    Returns:
        ``(envelope, frame_rate)``: frame ``i`` is centred on ``i / frame_rate``
        seconds after the first sample; ``frame_rate`` in frames per second.
    """
    import librosa

    y = _analysis_signal(samples, sample_rate)
    env = librosa.onset.onset_strength(y=y, sr=ANALYSIS_RATE, hop_length=ANALYSIS_HOP, n_fft=ANALYSIS_FFT)
    return env.astype(np.float64), ANALYSIS_RATE / ANALYSIS_HOP


def _harmonics(env: np.ndarray, times: np.ndarray, period_s: float) -> tuple[np.ndarray, float]:
    """Fourier coefficients of the onset envelope at the first :data:`PATTERN_HARMONICS` multiples of the beat rate.

    Returns ``(z, share)``: ``z[k-1] = sum (o - mean o) exp(-2 pi i k t / T)``, and
    the share of the envelope's variance they hold (0..1; about
    ``2 * PATTERN_HARMONICS / len(o)`` for noise).
    """
    o = np.asarray(env, dtype=np.float64)
    o = o - o.mean()
    power = float(np.dot(o, o))
    k = np.arange(1, PATTERN_HARMONICS + 1)[:, None]
    z = np.exp(-2j * np.pi * k * np.asarray(times)[None, :] / period_s) @ o
    if power <= 0 or o.size < 2:
        return z, 0.0
    return z, float(min(2.0 * np.sum(np.abs(z) ** 2) / (o.size * power), 1.0))


def beat_periodicity(env: np.ndarray, frame_rate: float, period_s: float, *, window_beats: int = CONFIDENCE_WINDOW_BEATS) -> float:
    """How much of an onset envelope repeats with the beat: the grid confidence (0..1).

    The share of the envelope's variance held by the first
    :data:`PATTERN_HARMONICS` harmonics of the beat rate, in windows of
    ``window_beats`` whole beats (half-overlapping), median over the windows.
    Any pattern that repeats every beat counts (an off-beat hi-hat as much as a
    kick on the beat); onsets off the grid, or a grid at the wrong tempo, do not.
    """
    if env.size < 2 or period_s <= 0:
        return 0.0
    per = period_s * frame_rate  # frames per beat
    beats = max(min(window_beats, int(env.size / per)), 1)
    whole = min(max(int(round(beats * per)), 2), env.size)
    values = []
    for start in range(0, env.size - whole + 1, max(whole // 2, 1)):
        t = np.arange(start, start + whole) / frame_rate
        values.append(_harmonics(env[start : start + whole], t, period_s)[1])
    return float(np.median(values))


def pattern_shift(env_a: np.ndarray, times_a: np.ndarray, env_b: np.ndarray, times_b: np.ndarray, period_s: float) -> tuple[float, float, float]:
    """How far the beat pattern of envelope ``b`` is shifted from that of ``a``, on one time axis.

    Each envelope is folded onto one beat (its first :data:`PATTERN_HARMONICS`
    harmonics of the beat rate, so a kick, an off-beat hat and a snare all
    count, each at its place in the beat); the shift is where the circular
    cross-correlation of the two folded patterns peaks.

    Returns:
        ``(shift_s, share_a, share_b)``: the shift in ``[-T/2, T/2)`` seconds
        (positive: ``b``'s beats come later than ``a``'s grid would put them),
        and the variance share of each envelope on the beat's harmonics.
    """
    za, share_a = _harmonics(env_a, times_a, period_s)
    zb, share_b = _harmonics(env_b, times_b, period_s)
    steps = max(int(round(period_s / SHIFT_RESOLUTION_S)), 8)
    tau = (np.arange(steps) / steps - 0.5) * period_s
    k = np.arange(1, PATTERN_HARMONICS + 1)[:, None]
    corr = np.real((zb * np.conj(za)) @ np.exp(2j * np.pi * k * tau[None, :] / period_s))
    i = int(np.argmax(corr))
    shift = float(tau[i])
    a, b, c = corr[i - 1], corr[i], corr[(i + 1) % steps]
    denom = a - 2 * b + c
    if denom < 0:
        shift += float(np.clip(0.5 * (a - c) / denom, -0.5, 0.5)) * period_s / steps
    return (shift + period_s / 2) % period_s - period_s / 2, share_a, share_b


def _refine_peaks(env: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Each tracked beat moved to the onset peak within :data:`PEAK_SEARCH_FRAMES`, sub-frame (parabola)."""
    out = []
    n = env.size
    for f in frames:
        lo, hi = max(int(f) - PEAK_SEARCH_FRAMES, 0), min(int(f) + PEAK_SEARCH_FRAMES + 1, n)
        i = lo + int(np.argmax(env[lo:hi]))
        shift = 0.0
        if 0 < i < n - 1:
            a, b, c = env[i - 1], env[i], env[i + 1]
            denom = a - 2 * b + c
            if denom < 0:
                shift = float(np.clip(0.5 * (a - c) / denom, -0.5, 0.5))
        out.append(i + shift)
    return np.asarray(out, dtype=np.float64)


def _fit_grid(times: np.ndarray, period_guess: float) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Least-squares ``t = a + k * T`` through the tracked beats, dropping beats off the line.

    Beats are numbered from gap to gap (a gap of about two periods is a missed
    beat), so an error in the guessed period does not accumulate along the
    track. Beats farther than :data:`OUTLIER_BEAT_FRACTION` of a beat from the
    line are dropped, then those farther than half that, refitting each time
    (the tracker's first and last beats are often placed on weak onsets).

    Returns ``(a, T, beat numbers, kept mask)``.
    """
    gaps = np.maximum(np.round(np.diff(times) / period_guess), 1)
    k = np.concatenate(([0.0], np.cumsum(gaps)))
    keep = np.ones(times.size, dtype=bool)
    slope, intercept = np.polyfit(k, times, 1)
    for fraction in (OUTLIER_BEAT_FRACTION, OUTLIER_BEAT_FRACTION / 2):
        residual = times - (intercept + k * slope)
        new_keep = np.abs(residual) <= fraction * slope
        if new_keep.sum() < 2:
            break
        keep = new_keep
        slope, intercept = np.polyfit(k[keep], times[keep], 1)
    return float(intercept), float(slope), k, keep


def _downbeat_phase(y: np.ndarray, grid_times: np.ndarray, beats_per_bar: int) -> int:
    """The grid phase (``0..beats_per_bar-1``) of the downbeats (see the module docstring).

    Per bar position, averaged over the bars: the low-band onset (kick, bass),
    the high-band onset (snare, clap) and the chroma change across the beat,
    each relative to its mean over the positions. In an even meter the strong
    beats are first told from the weak ones (more low band than high band: the
    backbeat's snare is on the weak beats, and a four-on-the-floor kick is on
    all of them); the downbeat is then the strong beat with the most low-band
    onset plus chroma change (the bass and the harmony move on the one).
    """
    import librosa

    if beats_per_bar == 1 or grid_times.size < beats_per_bar:
        return 0
    mel_hz = librosa.mel_frequencies(n_mels=128 + 2, fmax=ANALYSIS_RATE / 2)[1:-1]
    split = max(int(np.searchsorted(mel_hz, LOW_BAND_HZ)), 1)
    bands = librosa.onset.onset_strength_multi(
        y=y, sr=ANALYSIS_RATE, hop_length=ANALYSIS_HOP, n_fft=ANALYSIS_FFT, channels=[0, split, mel_hz.size]
    )
    chroma = librosa.feature.chroma_stft(y=y, sr=ANALYSIS_RATE, hop_length=ANALYSIS_HOP, n_fft=4 * ANALYSIS_FFT)
    frame_rate = ANALYSIS_RATE / ANALYSIS_HOP
    frames = np.round((grid_times + BEAT_LATENCY_S) * frame_rate).astype(int)
    n = bands.shape[1]
    period_frames = max(int(np.median(np.diff(frames))) if frames.size > 1 else 1, 2)
    sums = np.zeros((3, beats_per_bar))  # low onset, high onset, chroma change
    counts = np.zeros(beats_per_bar)
    for index, f in enumerate(frames):
        if f < 0 or f >= n:
            continue
        phase = index % beats_per_bar
        near = slice(max(f - PEAK_SEARCH_FRAMES, 0), f + PEAK_SEARCH_FRAMES + 1)
        before = chroma[:, max(f - period_frames // 2, 0) : max(f, 1)].mean(axis=1)
        after = chroma[:, f : min(f + period_frames // 2, n) + 1].mean(axis=1)
        sums[:, phase] += (bands[0, near].max(), bands[1, near].max(), float(np.sum(np.abs(after - before))))
        counts[phase] += 1
    feats = sums / np.maximum(counts, 1)
    feats = feats / np.maximum(feats.mean(axis=1, keepdims=True), 1e-12)
    low, high, change = feats
    candidates = np.arange(beats_per_bar)
    if beats_per_bar % 2 == 0:
        strong = low - high
        parity = int(np.argmax([strong[0::2].mean(), strong[1::2].mean()]))
        candidates = candidates[parity::2]
    return int(candidates[np.argmax((low + change)[candidates])])


@dataclass(frozen=True)
class _Track:
    """One run of the tracker at one tempo, with the line fitted through its beats."""

    intercept_s: float
    period_s: float
    times_s: np.ndarray  # refined beat times, s
    keep: np.ndarray  # beats on the line
    numbers: np.ndarray  # beat numbers along the line
    confidence: float


def _track(env: np.ndarray, tempo: float) -> _Track | None:
    """librosa's beat tracker at ``tempo`` bpm, refined and fitted; None when it finds too little."""
    import librosa

    frame_rate = ANALYSIS_RATE / ANALYSIS_HOP
    _, frames = librosa.beat.beat_track(onset_envelope=env, sr=ANALYSIS_RATE, hop_length=ANALYSIS_HOP, bpm=tempo, trim=True)
    frames = frames[(frames >= 0) & (frames < env.size)]
    if frames.size < 2:
        return None
    times = _refine_peaks(env, frames) / frame_rate
    intercept, period_s, numbers, keep = _fit_grid(times, 60.0 / tempo)
    if not 60.0 / MAX_BPM <= period_s <= 60.0 / MIN_BPM:
        return None
    confidence = beat_periodicity(env, frame_rate, period_s)
    return _Track(intercept, period_s, times, keep, numbers, confidence)


def _prior_weight(bpm: float, prior: float, spread: float) -> float:
    return math.exp(-0.5 * (math.log2(bpm / prior) / spread) ** 2)


def detect_beats(
    samples: Any,
    sample_rate: int,
    *,
    bpm_prior: float | None = None,
    beats_per_bar: int = 4,
) -> BeatGrid:
    """Tempo, beat grid, downbeats and a confidence for ``[C, N]`` audio (see the module docstring).

    Args:
        samples: ``[C, N]`` audio (or ``[N]`` mono), any sample rate.
        sample_rate: Hz.
        bpm_prior: expected tempo (the prompt file's ``bpm``), or None.
        beats_per_bar: from the meter (4 for 4/4).

    Returns:
        :class:`BeatGrid`; ``clear`` is False for silence, ambient music and noise.
    """
    import librosa

    audio = as_audio(samples)
    prior = float(bpm_prior) if bpm_prior else DEFAULT_TEMPO_PRIOR_BPM
    unclear = BeatGrid(sample_rate, False, None, None, None, (), beats_per_bar, 0.0, prior)
    if audio.size == 0 or float(np.max(np.abs(audio))) < SILENCE_PEAK:
        return unclear
    y = _analysis_signal(audio, sample_rate)
    env = librosa.onset.onset_strength(y=y, sr=ANALYSIS_RATE, hop_length=ANALYSIS_HOP, n_fft=ANALYSIS_FFT).astype(np.float64)
    if not env.any():
        return unclear
    spread = PRIOR_SPREAD_GIVEN if bpm_prior else PRIOR_SPREAD_NONE
    tempo = float(
        librosa.feature.tempo(
            onset_envelope=env, sr=ANALYSIS_RATE, hop_length=ANALYSIS_HOP, start_bpm=prior, std_bpm=spread,
            ac_size=TEMPO_AUTOCORRELATION_S, max_tempo=MAX_BPM,
        )[0]
    )  # fmt: skip
    best = _track(env, tempo) if MIN_BPM <= tempo <= MAX_BPM else None
    if best is None or best.confidence < CLEAR_BEAT_CONFIDENCE:
        def score(t: _Track | None) -> float:
            return -1.0 if t is None else t.confidence * _prior_weight(60.0 / t.period_s, prior, spread)

        for ratio in TEMPO_RATIOS:
            if MIN_BPM <= tempo * ratio <= MAX_BPM:
                other = _track(env, tempo * ratio)
                if other is not None and other.confidence >= CLEAR_BEAT_CONFIDENCE and score(other) > score(best):
                    best = other
    if best is None:
        return unclear

    period_s, keep = best.period_s, best.keep
    residual = best.times_s[keep] - (best.intercept_s + best.numbers[keep] * period_s)
    # the grid over the whole audio, from its first beat at or after the start
    duration_s = audio.shape[1] / sample_rate
    first = best.intercept_s - math.floor(best.intercept_s / period_s) * period_s
    grid_times = np.arange(first, duration_s, period_s)
    phase = _downbeat_phase(y, grid_times, beats_per_bar)
    origin_s = first + phase * period_s - BEAT_LATENCY_S
    beats = np.round((best.times_s[keep] - BEAT_LATENCY_S) * sample_rate).astype(int)
    beats = beats[(beats >= 0) & (beats < audio.shape[1])]
    clear = best.confidence >= CLEAR_BEAT_CONFIDENCE and int(keep.sum()) >= MIN_CLEAR_BEATS
    return BeatGrid(
        sample_rate=sample_rate,
        clear=bool(clear),
        bpm=60.0 / period_s,
        period=period_s * sample_rate,
        origin=origin_s * sample_rate,
        beats=tuple(int(b) for b in beats),
        beats_per_bar=beats_per_bar,
        confidence=best.confidence,
        bpm_prior=prior,
        residual_ms=float(np.sqrt(np.mean(residual**2))) * 1000.0,
    )


__all__ = [
    "BEAT_LATENCY_S",
    "CLEAR_BEAT_CONFIDENCE",
    "BeatGrid",
    "beat_periodicity",
    "detect_beats",
    "onset_envelope",
    "pattern_shift",
]
