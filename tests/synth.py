"""Synthetic, music-like test signals and a plain ffmpeg encoder for tests and benches.

Nothing here is under test; it stands in for MusicGen output (tones with
envelopes, noise bursts, a bass pad, a DC offset like the tiny model's) and for
the export stage's encoder, which another module owns.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from tydust_gen.export.loudness import ffmpeg_exe

SR = 44_100  # Hz
NOTES_HZ = (110.0, 146.83, 164.81, 220.0, 261.63, 329.63, 392.0, 440.0)


def music(
    seconds: float,
    *,
    sr: int = SR,
    seed: int = 0,
    bpm: float = 123.0,
    level: float = 0.2,
    dc: float = 0.0,
) -> np.ndarray:
    """Stereo float32 ``[2, N]``: a note on every beat, a noise burst every other beat, a 55 Hz pad.

    At 123 bpm a bar of 4 beats is 1.951 s, so 10 s is 5.125 bars: a hard cut
    at 10 s lands mid-note.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    out = np.zeros((2, n))
    beat = 60.0 / bpm
    k = 0
    while k * beat < seconds:
        start = int(k * beat * sr)
        freq = NOTES_HZ[rng.integers(len(NOTES_HZ))]
        length = min(n - start, int(beat * 1.5 * sr))
        t = np.arange(length) / sr
        env = np.minimum(t / 0.005, 1.0) * np.exp(-t / (beat * 0.6))
        tone = env * (
            np.sin(2 * np.pi * freq * t) + 0.5 * np.sin(4 * np.pi * freq * t + 0.3) + 0.25 * np.sin(6 * np.pi * freq * t)
        )
        pan = rng.uniform(0.3, 0.7)
        out[0, start : start + length] += tone * (1 - pan)
        out[1, start : start + length] += tone * pan
        if k % 2 == 1:
            burst = min(n - start, int(0.05 * sr))
            out[:, start : start + burst] += 0.3 * rng.standard_normal(burst) * np.exp(-np.arange(burst) / sr / 0.01)
        k += 1
    t = np.arange(n) / sr
    out += 0.3 * np.sin(2 * np.pi * 55.0 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.25 * t))
    return (out * level + dc).astype(np.float32)


def encode(samples: np.ndarray, sr: int, path: Path) -> Path:
    """Encode ``[2, N]`` float32 to MP3 (libmp3lame 192k CBR) or OGG (libvorbis q6) by suffix."""
    codec = {
        ".mp3": ["-c:a", "libmp3lame", "-b:a", "192k"],
        ".ogg": ["-c:a", "libvorbis", "-q:a", "6"],
    }[path.suffix]
    cmd = [
        ffmpeg_exe(), "-nostdin", "-v", "error", "-y",
        "-f", "f32le", "-ar", str(sr), "-ac", str(samples.shape[0]), "-i", "-",
        *codec, str(path),
    ]  # fmt: skip
    data = np.ascontiguousarray(samples.T, dtype="<f4").tobytes()
    proc = subprocess.run(cmd, input=data, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed: {proc.stderr.decode(errors='replace')}")
    return path


BASS_HZ = (55.0, 43.65, 65.41, 49.0)  # A1 F1 C2 G1: one root per bar, so harmony changes on the downbeat


def groove_beats(seconds: float, *, bpm: float, beats_per_bar: int = 4, pickup_beats: int = 0, sr: int = SR) -> tuple[np.ndarray, np.ndarray]:
    """The true beat and downbeat positions (samples) of :func:`groove` with the same arguments."""
    period = 60.0 / bpm * sr
    count = int(np.floor(seconds * sr / period - 1e-9)) + 1
    beats = np.arange(count) * period
    index = np.arange(count) - pickup_beats  # beat index within the music: 0 is the first downbeat
    return beats, beats[index % beats_per_bar == 0]


def groove(
    seconds: float,
    *,
    bpm: float = 120.0,
    beats_per_bar: int = 4,
    pickup_beats: int = 0,
    sr: int = SR,
    seed: int = 0,
    level: float = 0.25,
) -> np.ndarray:
    """Stereo float32 ``[2, N]`` drum-and-bass groove with a known tempo and meter.

    Beat ``k`` starts exactly at sample ``k * 60 / bpm * sr`` (no quantisation to
    the sample grid). Kick on beats 1 and 3 of 4 (on 1 in 3/4), snare on 2 and 4
    (on 2 and 3 in 3/4), closed hats on every eighth, a bass note per bar that
    changes root on the downbeat. The first ``pickup_beats`` beats are the end of
    a bar (an anacrusis), so the audio does not start on a downbeat.
    """
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    out = np.zeros((2, n))
    period = 60.0 / bpm * sr

    def add(start: float, sound: np.ndarray, pan: float = 0.5) -> None:
        i = int(round(start))
        if i >= n:
            return
        part = sound[: n - i]
        out[0, i : i + part.size] += part * (1 - pan) * 2
        out[1, i : i + part.size] += part * pan * 2

    def seconds_axis(length_s: float) -> np.ndarray:
        return np.arange(int(length_s * sr)) / sr

    t = seconds_axis(0.35)
    kick = np.sin(2 * np.pi * (50 * t + (120 - 50) * 0.03 * (1 - np.exp(-t / 0.03)))) * np.exp(-t / 0.12)
    t = seconds_axis(0.2)
    snare_noise = rng.standard_normal(t.size)
    snare = (0.6 * snare_noise + 0.5 * np.sin(2 * np.pi * 190 * t)) * np.exp(-t / 0.06)
    t = seconds_axis(0.05)
    hat_noise = np.diff(rng.standard_normal(t.size + 1))  # first difference: a crude high-pass
    hat = 0.25 * hat_noise * np.exp(-t / 0.012)

    beats, _ = groove_beats(seconds, bpm=bpm, beats_per_bar=beats_per_bar, pickup_beats=pickup_beats, sr=sr)
    for k, start in enumerate(beats):
        pos = (k - pickup_beats) % beats_per_bar  # 0 = downbeat
        kick_on = (0,) if beats_per_bar == 3 else (0, 2)
        if pos in kick_on:
            add(start, 0.9 * kick)
        else:
            add(start, 0.5 * snare, pan=0.45)
        add(start, hat, pan=0.65)
        add(start + period / 2, 0.7 * hat, pan=0.65)
        if pos == 0:
            bar = (k - pickup_beats) // beats_per_bar
            f = BASS_HZ[bar % len(BASS_HZ)]
            t = np.arange(int(beats_per_bar * period)) / sr
            env = np.minimum(t / 0.004, 1.0) * np.exp(-t / (beats_per_bar * period / sr * 0.7))
            bass = env * (np.sin(2 * np.pi * f * t) + 0.4 * np.sin(4 * np.pi * f * t) + 0.2 * np.sin(6 * np.pi * f * t))
            add(start, 0.45 * bass)
    return (out * level).astype(np.float32)


def ambient(seconds: float, *, sr: int = SR, seed: int = 0, level: float = 0.2) -> np.ndarray:
    """Stereo float32 ``[2, N]`` with no beat: slowly swelling detuned pads and soft noise, no transients."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    out = np.zeros((2, n))
    for f in (110.0, 164.81, 220.0, 277.18, 329.63):
        for ch in range(2):
            detune = 1 + rng.uniform(-0.003, 0.003)
            swell = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.03, 0.11) * t + rng.uniform(0, 6.3))
            out[ch] += swell * np.sin(2 * np.pi * f * detune * t + rng.uniform(0, 6.3)) / 5
    from scipy.signal import butter, sosfilt

    noise = sosfilt(butter(2, 800, fs=sr, output="sos"), rng.standard_normal((2, n)), axis=1)
    out += 0.05 * noise
    return (out * level).astype(np.float32)
