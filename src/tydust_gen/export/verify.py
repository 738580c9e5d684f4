"""Reading finished files back: format, rate, channels, bitrate and exact length, and their sha256.

Nothing a user typed (title, prompt, genre in the tags) may change how a file is
verified: lengths come from the audio stream, never from a search of the bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tydust_gen.audio.resample import TARGET_CHANNELS, TARGET_SAMPLE_RATE
from tydust_gen.base.errors import ExportError

MP3_BITRATE_BPS = 192_000


MP3_STANDARD_BITRATES = tuple(k * 1000 for k in (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320))


DURATION_TOLERANCE_S = 0.05  # seconds between requested and read-back length


@dataclass(frozen=True)
class ExportedFile:
    """One finished, verified output file as mutagen reads it back.

    Attributes:
        path: final location.
        format: "mp3" or "ogg".
        size_bytes: file size.
        duration_s: playing time in seconds (MP3: from the gapless header, see
            :func:`mp3_gapless_duration`; OGG: mutagen's length).
        bitrate_bps: bitrate (MP3: the CBR rate; OGG: the nominal rate).
        sample_rate: Hz.
        channels: 2.
        sha256: hex digest of the file.
    """

    path: Path
    format: str
    size_bytes: int
    duration_s: float
    bitrate_bps: int
    sample_rate: int
    channels: int
    sha256: str


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def mp3_gapless_duration(path: Path, sample_rate: int) -> float | None:
    """Exact playing time of an MP3 from its Xing/Info header's encoder delay and padding.

    mutagen only subtracts delay/padding when the encoder string starts with
    "LAME"; ffmpeg writes "Lavc..." in the same field, so mutagen's length is
    25–50 ms long. Returns None when the header is absent or incomplete.
    """
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    for magic in (b"Info", b"Xing"):
        i = head.find(magic)
        if i >= 0:
            break
    else:
        return None
    flags = int.from_bytes(head[i + 4 : i + 8], "big")
    j = i + 8
    if not flags & 1:  # no frame count
        return None
    frames = int.from_bytes(head[j : j + 4], "big")
    j += 4
    j += 4 if flags & 2 else 0  # byte count
    j += 100 if flags & 4 else 0  # seek table
    j += 4 if flags & 8 else 0  # quality
    ext = head[j + 21 : j + 24]
    if len(ext) < 3:
        return None
    delay = (ext[0] << 4) | (ext[1] >> 4)
    padding = ((ext[1] & 0x0F) << 8) | ext[2]
    samples = frames * 1152 - delay - padding  # MPEG-1 layer III: 1152 samples per frame
    return samples / sample_rate if samples > 0 else None


def inspect_file(path: Path, fmt: str) -> ExportedFile:
    """Read an encoded file back with mutagen.

    Raises:
        ExportError: mutagen cannot parse it.
    """
    try:
        if fmt == "mp3":
            from mutagen.mp3 import MP3

            info = MP3(path).info
        else:
            from mutagen.oggvorbis import OggVorbis

            info = OggVorbis(path).info
    except Exception as exc:  # noqa: BLE001 - mutagen raises many types for a bad file
        raise ExportError(f"{path.name} is not a readable {fmt.upper()} file: {exc}") from exc
    bitrate = int(getattr(info, "bitrate", 0) or getattr(info, "nominal_bitrate", 0) or 0)
    duration = float(info.length)
    if fmt == "mp3":
        duration = mp3_gapless_duration(path, int(info.sample_rate)) or duration
        from mutagen.mp3 import BitrateMode

        # mutagen derives the rate from byte and frame counts, which rounds short
        # files to e.g. 191,990; a CBR stream's frames all carry one standard rate.
        if info.bitrate_mode != BitrateMode.CBR:
            raise ExportError(f"{path.name} is not constant-bitrate ({info.bitrate_mode}); this is a bug, please report it")
        bitrate = min(MP3_STANDARD_BITRATES, key=lambda b: abs(b - bitrate))
    return ExportedFile(
        path=path,
        format=fmt,
        size_bytes=path.stat().st_size,
        duration_s=duration,
        bitrate_bps=bitrate,
        sample_rate=int(info.sample_rate),
        channels=int(info.channels),
        sha256=sha256_file(path),
    )


def check_promises(f: ExportedFile, expected_duration_s: float) -> None:
    problems = []
    if f.sample_rate != TARGET_SAMPLE_RATE:
        problems.append(f"sample rate {f.sample_rate} Hz")
    if f.channels != TARGET_CHANNELS:
        problems.append(f"{f.channels} channels")
    if f.format == "mp3" and f.bitrate_bps != MP3_BITRATE_BPS:
        problems.append(f"bitrate {f.bitrate_bps} bit/s")
    if abs(f.duration_s - expected_duration_s) > DURATION_TOLERANCE_S:
        problems.append(f"duration {f.duration_s:.3f} s instead of {expected_duration_s:.3f} s")
    if problems:
        raise ExportError(f"{f.path.name} came out wrong ({', '.join(problems)}); this is a bug, please report it")
