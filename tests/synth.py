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
