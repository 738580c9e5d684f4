"""Encoding through pydub + ffmpeg: MP3 192 kbit/s CBR (libmp3lame) and OGG Vorbis q6 (libvorbis).

pydub's cost stays in this module. Its ``export(path)`` truncates the
destination before encoding and leaks temporaries on failure, so it only ever
writes inside a staging folder (:mod:`.staging`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from tydust_gen.audio.resample import TARGET_CHANNELS, TARGET_SAMPLE_RATE, to_pcm16
from tydust_gen.base import faults
from tydust_gen.base import processes as children
from tydust_gen.base.errors import ExportError
from tydust_gen.base.waveform import Waveform
from tydust_gen.export.ffmpeg import Ffmpeg

MP3_BITRATE = "192k"  # constant bitrate, libmp3lame


OGG_QUALITY = "6"  # libvorbis -q:a 6 (~192 kbit/s nominal)


FFMPEG_TIMEOUT_S = 600  # seconds; a 10-minute track encodes in well under a minute


def pcm_segment(wave: Waveform):
    with warnings.catch_warnings():
        # pydub warns at import when ffmpeg is not on PATH; we hand it the path ourselves.
        warnings.simplefilter("ignore", RuntimeWarning)
        from pydub import AudioSegment
    return AudioSegment(data=to_pcm16(wave), sample_width=2, frame_rate=wave.sample_rate, channels=wave.channels)


def encode_segment(segment, ffmpeg: Ffmpeg, fmt: str, dest: Path) -> None:
    from pydub.exceptions import CouldntEncodeError

    segment.converter = ffmpeg.path
    common = ["-ar", str(TARGET_SAMPLE_RATE), "-ac", str(TARGET_CHANNELS), "-loglevel", "error", "-hide_banner"]
    if fmt == "mp3":
        kwargs = dict(format="mp3", codec="libmp3lame", bitrate=MP3_BITRATE, parameters=common)
    else:
        kwargs = dict(format="ogg", codec="libvorbis", parameters=["-q:a", OGG_QUALITY, *common])
    try:
        with children.reaped():
            handle = segment.export(str(dest), **kwargs)
        handle.close()
        faults.maybe_fail_write(fmt, dest)
    except CouldntEncodeError as exc:
        text = str(exc)
        tool_err = text.split("Output from ffmpeg/avlib:", 1)[-1].strip().splitlines()
        detail = tool_err[-1] if tool_err else text.splitlines()[0]
        raise ExportError(f"ffmpeg failed to encode {dest.name}: {detail}") from exc
    except OSError as exc:
        raise ExportError(f"could not write {dest.name}: {exc.strerror or exc}") from exc
