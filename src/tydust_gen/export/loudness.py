"""Mastering checked on the encoded files: master, encode, decode, measure, re-master.

Lossy encoders raise the true peak by a few tenths of a dB (FACTS.md: about
0.2 dB), so :func:`master_for_encoding` masters with a safety margin
(:func:`tydust_gen.audio.master.master`), encodes through a callback, measures
the decoded files (:func:`encoded_true_peak`) and re-masters with a larger
margin (:func:`ceiling_margin_for`) until every file meets the ceiling.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from tydust_gen.base import processes
from tydust_gen.base.digest import sha256_file
from tydust_gen.base.errors import ExportError, SettingsError
from tydust_gen.audio.master import (
    SILENCE_DB, DEFAULT_CEILING_DBTP, DEFAULT_TARGET_LUFS, MasterResult, TruePeakMeter, master, one_scan_thread,
)  # fmt: skip

DEFAULT_ENCODE_MARGIN_DB = 0.3  # dB; first-try headroom for the lossy-codec peak rise (~0.2 dB)


ENCODE_MARGIN_EXTRA_DB = 0.1  # dB; added on each retry: the overshoot varies by ~0.1 dB with level and limiting


DEFAULT_ENCODE_TRIES = 3  # master/encode/measure rounds before giving up


ENCODED_SAMPLE_RATE = 44_100  # Hz; rate encoded files are decoded at for measurement


ENCODED_CHANNELS = 2


@dataclass(frozen=True)
class EncodedMasterResult:
    """Outcome of :func:`master_for_encoding`.

    Attributes:
        master: the mastering pass whose encodes were kept.
        paths: the encoded files of that pass.
        encoded_true_peaks_dbtp: true peak of each decoded file, dBTP, same order as ``paths``.
        margin_db: headroom below the ceiling the kept pass was mastered with, dB.
        tries: master/encode rounds used.
        ceiling_met: every decoded file is at or below the ceiling.
    """

    master: MasterResult
    paths: tuple[Path, ...]
    encoded_true_peaks_dbtp: tuple[float, ...]
    margin_db: float
    tries: int
    ceiling_met: bool


@dataclass(frozen=True)
class MeasuredFile:
    """An encoded file whose true peak was measured as soon as it was written (:func:`measure_file`),
    or while it was being written (:class:`EncodedPeaks`).

    An ``encode`` callback of :func:`master_for_encoding` may return these instead of
    paths, so each file is measured while the others are still encoding.

    Attributes:
        path: the file.
        true_peak_dbtp: true peak of its decoded audio, dBTP.
        while_written: measured from the bytes as the encoder wrote them (checked equal to the file's).
    """

    path: Path
    true_peak_dbtp: float
    while_written: bool = False


def ffmpeg_exe() -> str:
    """The ffmpeg the export stage uses (``$TYDUST_FFMPEG``, PATH, or the imageio-ffmpeg wheel).

    Raises:
        FfmpegError: none runs.
    """
    from tydust_gen.export.ffmpeg import find_ffmpeg

    return find_ffmpeg().path


DECODE_PIECE_FRAMES = 1 << 15  # samples per channel read from the decoder at a time (0.74 s at 44.1 kHz)


DECODE_PIPE_BYTES = 1 << 20  # the decoder's output pipe (Linux): room to decode ahead while a piece is scanned


def decoded_pieces(
    path: str | os.PathLike[str],
    *,
    sample_rate: int = ENCODED_SAMPLE_RATE,
    channels: int = ENCODED_CHANNELS,
    max_seconds: float | None = None,
    piece_frames: int = DECODE_PIECE_FRAMES,
    purpose: str = "",
) -> Iterator[np.ndarray]:
    """Decode any file ffmpeg reads, yielding float32 ``[channels, n]`` pieces as ffmpeg produces them.

    Decoding to 32-bit float keeps overshoots above full scale, which is the point when measuring
    the true peak of an encoded file. The decoder is a child process; it is killed if the caller
    stops early (an error, Ctrl-C) and its errors become :class:`ExportError` at the end.

    Args:
        path: an MP3, OGG, WAV... file.
        sample_rate: Hz to decode at.
        channels: channel count to decode to.
        max_seconds: stop decoding after this many seconds (None: the whole file), so a
            caller with a length limit need not decode hours to find a file too long.
        piece_frames: samples per channel in each piece (the last may be shorter).
        purpose: what the decoding is for, for the error message (" to measure its peak").

    Raises:
        ExportError: ffmpeg could not decode the file (its stderr is included).
    """
    cmd = _decoder_command(["-i", os.fspath(path)], channels, sample_rate, max_seconds)
    # stderr to a file, so a chatty decoder cannot fill a pipe nobody reads
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
        try:
            processes.widen_pipe(proc.stdout, DECODE_PIPE_BYTES)  # 64 KB by default: the decoder would wait on us
            with proc.stdout:
                yield from _float_pieces(proc.stdout, channels, piece_frames)
            returncode = proc.wait()
        finally:
            if proc.poll() is None:  # stopped early: the decoder goes too
                proc.kill()
                proc.wait()
        if returncode != 0:
            errors.seek(0)
            stderr = errors.read().decode("utf-8", "replace").strip()
            raise ExportError(f"could not decode {path}{purpose}: {stderr}")


def _decoder_command(source: list[str], channels: int, sample_rate: int, max_seconds: float | None = None) -> list[str]:
    """ffmpeg decoding ``source`` (its input options) to interleaved float32 on stdout."""
    return [
        ffmpeg_exe(), "-nostdin", "-v", "error", *source,
        "-f", "f32le", "-acodec", "pcm_f32le", "-ac", str(channels), "-ar", str(sample_rate),
        *(["-t", f"{max_seconds:.6f}"] if max_seconds is not None else []), "-",
    ]  # fmt: skip


def _float_pieces(pipe: Any, channels: int, piece_frames: int) -> Iterator[np.ndarray]:
    """float32 ``[channels, n]`` pieces of interleaved f32le samples read from ``pipe`` until it ends."""
    frame = 4 * channels
    while data := pipe.read(piece_frames * frame):  # whole pieces until the end
        usable = len(data) - len(data) % frame
        yield np.frombuffer(data[:usable], dtype="<f4").reshape(-1, channels).T


def decode_audio(
    path: str | os.PathLike[str],
    *,
    sample_rate: int = ENCODED_SAMPLE_RATE,
    channels: int = ENCODED_CHANNELS,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decode any file ffmpeg reads to float32 ``[C, N]`` without clipping (:func:`decoded_pieces`, joined).

    Raises:
        ExportError: ffmpeg could not decode the file (its stderr is included).
    """
    pieces = list(decoded_pieces(path, sample_rate=sample_rate, channels=channels, max_seconds=max_seconds))
    if not pieces:
        return np.zeros((channels, 0), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(pieces, axis=1))


def encoded_true_peak(path: str | os.PathLike[str], *, circular: bool = False) -> float:
    """True peak (dBTP) of an encoded file, measured on its decoded 44.1 kHz stereo audio.

    Each piece is scanned as the decoder delivers it (:class:`TruePeakMeter`), so decoding (in
    ffmpeg's process) and scanning (here) overlap, and the decoded track is never held whole.

    Args:
        path: encoded file (MP3, OGG...).
        circular: include the seam of a loop.

    Returns:
        dBTP.
    """
    meter = TruePeakMeter(ENCODED_CHANNELS, circular=circular)
    with one_scan_thread():  # the decoder needs the other core
        for piece in decoded_pieces(path, purpose=" to measure its peak"):
            meter.feed(piece)
    return meter.true_peak_dbtp()


def measure_file(path: str | os.PathLike[str], *, circular: bool = False) -> MeasuredFile:
    """:func:`encoded_true_peak` of ``path``, kept with it (for an ``encode`` callback to return).

    Meant for an encoding thread, right after its file is written, while the other format may still
    be encoding: the calling thread runs at a lower priority (nice +10, Linux; the decoder it starts
    inherits it), so
    that measuring a finished file takes the CPU the unfinished encode leaves, not the encode's own.
    The thread should be one that ends with the encode (the priority cannot be raised back
    without privileges).
    """
    processes.run_in_background()
    return MeasuredFile(Path(path), encoded_true_peak(path, circular=circular))


FOLLOWED_FORMATS = ("ogg",)  # muxers that write front to back; ffmpeg's MP3 muxer rewrites its first frame at the end


FOLLOW_READ_BYTES = 1 << 16  # bytes read from the growing file at a time


FOLLOW_POLL_S = 0.02  # seconds between looks at a file that has not grown, until its writer is done


FOLLOW_FINISH_S = 120.0  # seconds the rest of a followed file may take to decode once its writer is done


class _Follower:
    """Decodes and meters an encoder's output file while the encoder writes it.

    Started by the encoding thread's child-start hook (:func:`processes.on_start`) with pydub's ffmpeg,
    whose command line ends with the file it writes. A feeder thread reads what has been written so far
    into a decoder (ffmpeg, reading its stdin) and a reader thread meters the decoded pieces
    (:class:`TruePeakMeter`); both run at background priority. When the encoder is done
    (:meth:`written`), the rest is read and the bytes fed are compared with the finished file: only if
    they are the same bytes does :meth:`peak` give a value; any failure (decoder, pipe, a byte that
    differs) gives None, and the caller measures the file itself.
    """

    def __init__(self, fmt: str, *, circular: bool):
        self.fmt, self.circular = fmt, circular
        self._done = threading.Event()  # the writer has finished the file: read to its end, then stop
        self._stop = threading.Event()  # abandoned: stop at once
        self._digest = hashlib.sha256()
        self._decoder: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._fed_all = False
        self._peak: float | None = None
        self.failure: BaseException | None = None  # why it could not measure, when it could not
        self.first_audio = threading.Event()  # set once the first decoded audio has been metered

    def start(self, writer: subprocess.Popen) -> None:
        """The child-start hook: follow the file ``writer``'s command line ends with (only the first child)."""
        if self._reader is not None or self._stop.is_set():
            return
        try:
            # Opened here, as the encoder starts: the follower's threads run at background priority and
            # may start late on a busy machine, and pydub deletes the file as soon as it has copied it.
            source = open(str(list(writer.args)[-1]), "rb")  # type: ignore[arg-type]  # noqa: SIM115
        except (OSError, IndexError, TypeError) as exc:
            self.failure = exc
            return
        reader = threading.Thread(target=self._read, args=(source,), name="tydust-follow", daemon=True)
        try:
            reader.start()
        except RuntimeError as exc:  # no thread to be had: the file is measured after it is written
            source.close()
            self.failure = exc
            return
        self._reader = reader

    def _read(self, source: Any) -> None:
        feeder = None
        try:
            processes.run_in_background()  # the decoder started here inherits it
            cmd = _decoder_command(["-f", self.fmt, "-i", "pipe:0"], ENCODED_CHANNELS, ENCODED_SAMPLE_RATE)
            decoder = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                       **processes.new_group_options())  # fmt: skip
            self._decoder = decoder
            if self._stop.is_set():  # abandoned while the decoder started
                return
            processes.widen_pipe(decoder.stdout, DECODE_PIPE_BYTES)
            feeder = threading.Thread(target=self._feed, args=(source, decoder), name="tydust-follow-feed", daemon=True)
            feeder.start()
            meter = TruePeakMeter(ENCODED_CHANNELS, circular=self.circular)
            with decoder.stdout:  # type: ignore[union-attr]
                for piece in _float_pieces(decoder.stdout, ENCODED_CHANNELS, DECODE_PIECE_FRAMES):
                    meter.feed(piece)
                    self.first_audio.set()
            feeder.join()
            if decoder.wait() == 0 and self._fed_all and not self._stop.is_set():
                self._peak = meter.true_peak_dbtp()
        except Exception as exc:  # noqa: BLE001 - any failure: the caller measures the finished file instead
            self._peak = None
            self.failure = exc
        finally:
            if self._decoder is not None:
                processes.kill_tree(self._decoder)
            if feeder is not None:
                feeder.join()
            if self._decoder is not None:
                for pipe in (self._decoder.stdin, self._decoder.stdout):
                    with contextlib.suppress(OSError, ValueError):
                        if pipe is not None:
                            pipe.close()
            source.close()

    def _feed(self, f: Any, decoder: subprocess.Popen) -> None:
        stdin = decoder.stdin
        assert stdin is not None
        try:
            processes.run_in_background()
            while not self._stop.is_set():
                finished = self._done.is_set()  # before the read: an empty read after it is the real end
                chunk = f.read(FOLLOW_READ_BYTES)
                if chunk:
                    self._digest.update(chunk)
                    stdin.write(chunk)
                elif finished:
                    stdin.close()  # flushes the last bytes: only then has everything been fed
                    self._fed_all = True
                    return
                else:
                    self._done.wait(FOLLOW_POLL_S)
        except Exception as exc:  # noqa: BLE001 - the decoder died (broken pipe), a read failed...
            self._fed_all = False
            self.failure = exc
        finally:
            with contextlib.suppress(OSError, ValueError):
                stdin.close()  # the decoder's end of input, whatever happened: it must not wait for more

    def written(self, dest: Path) -> None:
        """The encoder is done and its bytes are in ``dest``: decode the rest, then compare the bytes."""
        self._done.set()
        if self._reader is not None:
            self._reader.join(FOLLOW_FINISH_S)
            if self._reader.is_alive():  # a decoder that never ends: give up on it, measure the file instead
                self.abandon()
                return
        if self._peak is not None and self._digest.hexdigest() != sha256_file(dest):
            self._peak = None

    def abandon(self) -> None:
        """Stop following (the encode failed or is being cancelled); the decoder is killed and awaited."""
        self._stop.set()
        self._done.set()
        if self._decoder is not None:
            processes.kill_tree(self._decoder)
        if self._reader is not None:
            self._reader.join()
        self._peak = None

    def peak(self) -> float | None:
        """dBTP of the followed file, or None if it could not be measured while written."""
        return self._peak


class EncodedPeaks:
    """The true peak of each file one encode call writes, measured as early as each format allows.

    For a format in :data:`FOLLOWED_FORMATS` (OGG), the file is decoded and metered *while* the encoder
    writes it (:class:`_Follower`), so its peak is known a moment after the encoder ends instead of one
    more decode of the whole file later (0.3-0.4 s for a 90 s OGG on the 2-core machine); the bytes
    followed are checked equal to the finished file, else it is measured again after. Other formats
    (MP3, whose muxer rewrites its first frame at the end), and every format where an open file cannot
    be deleted under the reader (Windows), are measured right after they are written (:func:`measure_file`).

    Use one per encode call: pass :meth:`watch` and :meth:`measure` to ``Staging.encode``
    (``watch=``, ``then=``). Tags written between the two change only the comment header, not the audio.
    """

    def __init__(self, *, circular: bool = False):
        self.circular = circular
        self._followers: dict[Path, _Follower] = {}
        self._lock = threading.Lock()

    def watch(self, fmt: str, dest: Path) -> _Follower | None:
        """A follower for the encode of ``dest`` as ``fmt``, or None where the file is measured after."""
        if fmt not in FOLLOWED_FORMATS or os.name != "posix":
            return None
        follower = _Follower(fmt, circular=self.circular)
        with self._lock:
            self._followers[Path(dest)] = follower
        return follower

    def measure(self, dest: str | os.PathLike[str]) -> MeasuredFile:
        """The true peak of the written (and tagged) ``dest``: the follower's, or measured now."""
        with self._lock:
            follower = self._followers.pop(Path(dest), None)
        peak = None if follower is None else follower.peak()
        if peak is not None:
            return MeasuredFile(Path(dest), peak, while_written=True)
        return measure_file(dest, circular=self.circular)


def encoded_true_peaks(paths: Sequence[str | os.PathLike[str]], *, circular: bool = False) -> tuple[float, ...]:
    """:func:`encoded_true_peak` of every file at once, one thread each (same order as ``paths``).

    Each file is decoded once, by its own ffmpeg, and scanned while the others are: the
    decoder is a child process and torch's convolution releases the GIL.
    """
    if len(paths) <= 1:
        return tuple(encoded_true_peak(p, circular=circular) for p in paths)
    with one_scan_thread(), ThreadPoolExecutor(max_workers=len(paths), thread_name_prefix="tydust-peak") as pool:
        return tuple(pool.map(lambda p: encoded_true_peak(p, circular=circular), paths))


def ceiling_margin_for(
    encoded_peak_dbtp: float,
    ceiling_dbtp: float,
    current_margin_db: float,
) -> float | None:
    """Next mastering margin after measuring an encoded file, or None if it passed.

    The codec's overshoot is roughly independent of a small change in level, so
    the margin grows by the measured excess (plus :data:`ENCODE_MARGIN_EXTRA_DB`
    so the next try does not land a hair over again).

    Args:
        encoded_peak_dbtp: true peak of the decoded file, dBTP (the worst of
            all formats when several were encoded).
        ceiling_dbtp: the ceiling the files must meet, dBTP.
        current_margin_db: margin the audio was mastered with, dB.

    Returns:
        None when ``encoded_peak_dbtp <= ceiling_dbtp``; otherwise the margin to
        master with on the next try, dB.
    """
    excess = encoded_peak_dbtp - ceiling_dbtp
    if excess <= 0:
        return None
    return current_margin_db + excess + ENCODE_MARGIN_EXTRA_DB


@one_scan_thread()  # encoders, decoders and meters run side by side; each scan keeps to its core
def master_for_encoding(
    samples: Any,
    sample_rate: int,
    encode: Callable[[MasterResult], Sequence[str | os.PathLike[str] | MeasuredFile]],
    *,
    target_lufs: float | None = DEFAULT_TARGET_LUFS,
    ceiling_dbtp: float = DEFAULT_CEILING_DBTP,
    initial_margin_db: float = DEFAULT_ENCODE_MARGIN_DB,
    max_tries: int = DEFAULT_ENCODE_TRIES,
    circular: bool = False,
    **master_options: Any,
) -> EncodedMasterResult:
    """Master, encode, measure the decoded files, and re-master until they meet the ceiling.

    Args:
        samples: ``[C, N]`` audio.
        sample_rate: Hz.
        encode: callback that encodes ``result.samples`` (e.g. to MP3 and OGG)
            and returns the written paths, or :class:`MeasuredFile` for files it
            measured itself (:func:`measure_file`, e.g. each as soon as it was
            written); the rest are measured here, at once. It is called once per
            try; later tries should overwrite the same paths.
        target_lufs: LUFS, or None (see :func:`master`).
        ceiling_dbtp: dBTP the *decoded files* must meet.
        initial_margin_db: headroom for the first try, dB.
        max_tries: master/encode rounds (>= 1).
        circular: loop mode (see :func:`master`).
        **master_options: passed to :func:`master` (``limiter``, ``max_limiting_db``,
            ``highpass_hz``).

    Returns:
        :class:`EncodedMasterResult`; ``ceiling_met`` is False only if every try
        overshot (the files of the last try are kept).
    """
    if max_tries < 1:
        raise SettingsError(f"max_tries must be at least 1, got {max_tries}")
    margin = initial_margin_db
    for attempt in range(1, max_tries + 1):
        result = master(
            samples, sample_rate, target_lufs=target_lufs, ceiling_dbtp=ceiling_dbtp,
            margin_db=margin, circular=circular, **master_options,
        )  # fmt: skip
        written = list(encode(result))
        paths = tuple(w.path if isinstance(w, MeasuredFile) else Path(w) for w in written)
        unmeasured = [p for w, p in zip(written, paths) if not isinstance(w, MeasuredFile)]
        measured = iter(encoded_true_peaks(unmeasured, circular=circular))
        peaks = tuple(w.true_peak_dbtp if isinstance(w, MeasuredFile) else next(measured) for w in written)
        worst = max(peaks, default=SILENCE_DB)
        next_margin = ceiling_margin_for(worst, ceiling_dbtp, margin)
        if next_margin is None or attempt == max_tries:
            return EncodedMasterResult(
                master=result, paths=paths, encoded_true_peaks_dbtp=peaks,
                margin_db=margin, tries=attempt, ceiling_met=next_margin is None,
            )  # fmt: skip
        margin = next_margin
    raise AssertionError("unreachable")  # pragma: no cover
