"""Encoding through pydub + ffmpeg: MP3 192 kbit/s CBR (libmp3lame) and OGG Vorbis q6 (libvorbis).

pydub's cost stays in this module. Its ``export(path)`` truncates the
destination before encoding and leaks temporaries on failure, so it only ever
writes inside a staging folder (:mod:`.staging`).

The formats are encoded at the same time (:func:`encode_formats`): each pydub
export is an ffmpeg child that a thread waits on, and libmp3lame and libvorbis
are each single-threaded, so two formats take the time of the slower one on
two cores instead of the sum.
"""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

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


def encode_formats(
    segment,
    ffmpeg: Ffmpeg,
    jobs: Sequence[tuple[str, Path]],
    *,
    then: Callable[[str, Path], Any] | None = None,
    each_done: Callable[[str], None] | None = None,
    watch: Callable[[str, Path], Any] | None = None,
) -> list[Any]:
    """Encode ``segment`` to every ``(fmt, dest)`` of ``jobs`` at once, one thread (and ffmpeg) per format.

    Args:
        segment: the pydub ``AudioSegment`` (:func:`pcm_segment`).
        ffmpeg: the ffmpeg to run.
        jobs: ``[(fmt, dest), ...]``; ``dest`` must be inside a staging folder.
        then: called in the encoding thread right after ``dest`` is written (e.g. tagging, then
            measuring); what it returns is that job's result.
        each_done: called in the calling thread as each job finishes, in ``jobs`` order
            (test hooks must pause where signals are delivered: the main thread).
        watch: ``watch(fmt, dest)`` gives an object that follows the encoder's output while it is
            written (e.g. ``EncodedPeaks.watch``), or None: see :func:`encode_segment`.

    Returns:
        Each job's result, in order: ``then(fmt, dest)``, or ``dest`` without ``then``.

    Raises:
        ExportError: a format failed; the first failing job in ``jobs`` order is reported. The
            others' ffmpeg children are killed and their threads awaited before this returns,
            so nothing is still writing into the staging folder.
    """
    stop = threading.Event()

    def work(fmt: str, dest: Path) -> Any:
        if stop.is_set():  # the call is being abandoned: start no new ffmpeg
            raise ExportError(f"encoding {dest.name} was cancelled")
        follower = None if watch is None else watch(fmt, dest)
        encode_segment(segment, ffmpeg, fmt, dest, follower=follower)
        return dest if then is None else then(fmt, dest)

    pool = ThreadPoolExecutor(max_workers=max(1, len(jobs)), thread_name_prefix="tydust-encode")
    try:
        # One reaped() for all children: it swaps pydub's subprocess module, which threads must not race on.
        with children.reaped():
            try:
                futures = [pool.submit(work, fmt, dest) for fmt, dest in jobs]
                done = []
                for (fmt, _), future in zip(jobs, futures):
                    done.append(future.result())
                    if each_done is not None:
                        each_done(fmt)
                return done
            except BaseException:
                stop.set()
                raise  # reaped() kills the ffmpeg children on the way out; the threads then end quickly
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def encode_segment(segment, ffmpeg: Ffmpeg, fmt: str, dest: Path, *, follower: Any = None) -> None:
    """Encode ``segment`` to ``dest`` as ``fmt`` ("mp3" or "ogg"); call inside :func:`children.reaped`.

    ``follower``, when given, is told when pydub's ffmpeg starts (``follower.start(child)``; the child's
    command line ends with the file it writes), then either ``follower.written(dest)`` once ``dest``
    holds the encoded bytes, or ``follower.abandon()`` if encoding failed or was interrupted, before
    this returns or raises: nothing it started outlives the call.

    Raises:
        ExportError: ffmpeg failed (its last error line included) or ``dest`` could not be written.
    """
    from pydub.exceptions import CouldntEncodeError

    segment.converter = ffmpeg.path
    common = ["-ar", str(TARGET_SAMPLE_RATE), "-ac", str(TARGET_CHANNELS), "-loglevel", "error", "-hide_banner"]
    if fmt == "mp3":
        kwargs = dict(format="mp3", codec="libmp3lame", bitrate=MP3_BITRATE, parameters=common)
    else:
        kwargs = dict(format="ogg", codec="libvorbis", parameters=["-q:a", OGG_QUALITY, *common])
    try:
        try:
            with children.on_start(None if follower is None else follower.start):
                handle = segment.export(str(dest), **kwargs)
            handle.close()
            faults.maybe_fail_write(fmt, dest)
        except BaseException:
            if follower is not None:
                follower.abandon()
            raise
        if follower is not None:
            follower.written(dest)
    except CouldntEncodeError as exc:
        text = str(exc)
        tool_err = text.split("Output from ffmpeg/avlib:", 1)[-1].strip().splitlines()
        detail = tool_err[-1] if tool_err else text.splitlines()[0]
        raise ExportError(f"ffmpeg failed to encode {dest.name}: {detail}") from exc
    except OSError as exc:
        raise ExportError(f"could not write {dest.name}: {exc.strerror or exc}") from exc
