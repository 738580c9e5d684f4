"""Export stage: 44.1 kHz stereo float audio → verified MP3 192k CBR + OGG Vorbis q6.

Encoding goes through pydub and ffmpeg. ffmpeg is the system's when one is on
PATH, else the binary shipped in the ``imageio-ffmpeg`` wheel (no apt step);
``TYDUST_FFMPEG=/path/to/ffmpeg`` overrides both. That wheel has no ffprobe, so
outputs are verified by reading them back with mutagen.

Files appear whole or not at all. Everything is written inside a private
staging folder in the destination folder (so the final rename stays on one
file system): pydub's temporary WAV and encoder output, our encoded files, the
tags. Only after both files are encoded, tagged and verified are they moved into
place with ``os.replace``; the staging folder is removed in a ``finally``, on
success and on failure. pydub would otherwise truncate the destination before
encoding and leak its temporaries in the system temp folder on an ffmpeg error.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from . import children, faults
from .audio import TARGET_CHANNELS, TARGET_SAMPLE_RATE, to_pcm16
from .errors import ExportError, FfmpegError, OutputDirError
from .generate import Waveform

MP3_BITRATE = "192k"  # constant bitrate, libmp3lame
MP3_BITRATE_BPS = 192_000
MP3_STANDARD_BITRATES = tuple(k * 1000 for k in (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320))
OGG_QUALITY = "6"  # libvorbis -q:a 6 (~192 kbit/s nominal)
REQUIRED_ENCODERS = ("libmp3lame", "libvorbis")
FFMPEG_ENV = "TYDUST_FFMPEG"
STAGING_PREFIX = ".tydust-staging-"
DURATION_TOLERANCE_S = 0.05  # seconds between requested and read-back length
FFMPEG_TIMEOUT_S = 600  # seconds; a 10-minute track encodes in well under a minute


@dataclass(frozen=True)
class Ffmpeg:
    """A usable ffmpeg.

    Attributes:
        path: executable.
        source: "TYDUST_FFMPEG", "system" or "imageio-ffmpeg".
        version: first line of ``ffmpeg -version``.
    """

    path: str
    source: str
    version: str


@dataclass(frozen=True)
class TrackTags:
    """Metadata written into both files."""

    title: str
    genre: str | None
    comment: str
    bpm: float | None = None


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


def _version(path: str) -> str:
    proc = subprocess.run([path, "-hide_banner", "-version"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise OSError(proc.stderr.strip() or f"exit {proc.returncode}")
    return (proc.stdout.splitlines() or ["ffmpeg"])[0].strip()


def find_ffmpeg() -> Ffmpeg:
    """Locate ffmpeg: ``$TYDUST_FFMPEG``, then PATH, then the imageio-ffmpeg wheel.

    Raises:
        FfmpegError: none runs.
    """
    override = os.environ.get(FFMPEG_ENV)
    if override:
        try:
            return Ffmpeg(override, FFMPEG_ENV, _version(override))
        except (OSError, subprocess.SubprocessError) as exc:
            raise FfmpegError(f"{FFMPEG_ENV}={override} does not run ({exc}); fix the path or unset it") from None
    system = shutil.which("ffmpeg")
    if system:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return Ffmpeg(system, "system", _version(system))
    try:
        import imageio_ffmpeg

        bundled = imageio_ffmpeg.get_ffmpeg_exe()
        return Ffmpeg(bundled, "imageio-ffmpeg", _version(bundled))
    except Exception:  # noqa: BLE001 - any failure here means "no bundled ffmpeg"
        pass
    raise FfmpegError("ffmpeg not found; install tydust-gen with its dependencies (pip install imageio-ffmpeg) or put ffmpeg on PATH")


def check_encoders(ffmpeg: Ffmpeg) -> None:
    """Fail fast unless ffmpeg has libmp3lame and libvorbis.

    Raises:
        FfmpegError: an encoder is missing (names it).
    """
    try:
        proc = subprocess.run([ffmpeg.path, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise FfmpegError(f"could not list ffmpeg's encoders ({exc})") from None
    names = {line.split()[1] for line in proc.stdout.splitlines() if len(line.split()) > 1}
    missing = [e for e in REQUIRED_ENCODERS if e not in names]
    if missing:
        raise FfmpegError(
            f"ffmpeg at {ffmpeg.path} lacks the {', '.join(missing)} encoder; "
            f"use one built with it (pip install imageio-ffmpeg, or set {FFMPEG_ENV})"
        )


def check_output_dir(out_dir: Path) -> None:
    """Prove ``out_dir`` can be created and written, before any generation, without creating it.

    Checking must leave nothing behind when a later check fails, so the folder
    is only created by :func:`export_track`.

    Raises:
        OutputDirError: it, or the nearest existing folder above it, is not a writable folder.
    """
    probe = out_dir
    while not probe.exists():
        if probe.is_symlink():
            raise OutputDirError(f"output folder {out_dir} goes through a broken link {probe}; pick another --out-dir")
        parent = probe.parent
        if parent == probe:
            break
        probe = parent
    if not probe.is_dir():
        what = "is not a folder" if probe == out_dir else f"cannot be created: {probe} is not a folder"
        raise OutputDirError(f"output folder {out_dir} {what}; pick another --out-dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot write to output folder {out_dir}: {probe} is not writable; fix its permissions or pick another --out-dir")


def _make_output_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(f"cannot create output folder {out_dir}: {exc.strerror}; pick another --out-dir") from None


def output_paths(out_dir: Path, name: str) -> dict[str, Path]:
    """Final paths of a track's files: ``{"mp3": .../NAME.mp3, "ogg": .../NAME.ogg}``."""
    return {"mp3": out_dir / f"{name}.mp3", "ogg": out_dir / f"{name}.ogg"}


@contextlib.contextmanager
def _temporaries_in(folder: Path) -> Iterator[None]:
    """Make ``tempfile`` (and so pydub's temporary WAV and output) use ``folder``."""
    saved = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = saved


def _segment(wave: Waveform):
    with warnings.catch_warnings():
        # pydub warns at import when ffmpeg is not on PATH; we hand it the path ourselves.
        warnings.simplefilter("ignore", RuntimeWarning)
        from pydub import AudioSegment
    return AudioSegment(data=to_pcm16(wave), sample_width=2, frame_rate=wave.sample_rate, channels=wave.channels)


def _encode(segment, ffmpeg: Ffmpeg, fmt: str, dest: Path) -> None:
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


def write_tags(path: Path, fmt: str, tags: TrackTags) -> None:
    """Write title/genre/comment/bpm so players show them (ID3 COMM, Vorbis COMMENT)."""
    if fmt == "mp3":
        from mutagen.id3 import COMM, ID3, TBPM, TCON, TIT2, ID3NoHeaderError

        try:
            id3 = ID3(path)
        except ID3NoHeaderError:
            id3 = ID3()
        id3.delall("TXXX:comment")
        id3.add(TIT2(encoding=3, text=tags.title))
        if tags.genre:
            id3.add(TCON(encoding=3, text=tags.genre))
        id3.add(COMM(encoding=3, lang="eng", desc="", text=tags.comment))
        if tags.bpm is not None:
            id3.add(TBPM(encoding=3, text=str(round(tags.bpm))))
        id3.save(path)
    else:
        from mutagen.oggvorbis import OggVorbis

        ogg = OggVorbis(path)
        ogg["title"] = tags.title
        if tags.genre:
            ogg["genre"] = tags.genre
        ogg["comment"] = tags.comment
        if tags.bpm is not None:
            ogg["bpm"] = str(round(tags.bpm))
        ogg.save()


def _sha256(path: Path) -> str:
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
        sha256=_sha256(path),
    )


def _verify(f: ExportedFile, expected_duration_s: float) -> None:
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


def _write_staged(path: Path, content: bytes) -> Path:
    try:
        with open(path, "wb") as f:
            f.write(content)
            faults.maybe_fail_write(path.suffix.lstrip("."), path)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise ExportError(f"could not write {path.name}: {exc.strerror or exc}") from exc
    return path


class Staging:
    """A private folder inside the destination where one track's files are built.

    Use as a context manager: the folder (pydub's temporary WAV and encoder
    output, our encoded files, any extras) is removed on exit, success or not.
    :meth:`encode` may run several times (the mastering stage re-encodes until
    the decoded files meet the true-peak ceiling); :meth:`publish` verifies the
    staged files and moves them into place with ``os.replace``.
    """

    def __init__(self, out_dir: Path, name: str, *, ffmpeg: Ffmpeg):
        self.out_dir = out_dir
        self.name = name
        self.ffmpeg = ffmpeg
        self.path: Path | None = None
        self._extras: list[Path] = []

    def __enter__(self) -> "Staging":
        check_output_dir(self.out_dir)
        _make_output_dir(self.out_dir)
        self.path = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{self.name}-", dir=self.out_dir))
        return self

    def __exit__(self, *exc_info) -> None:
        if self.path is not None:
            with faults.signals_deferred():  # a second Ctrl-C must not leave the staging folder half removed
                shutil.rmtree(self.path, ignore_errors=True)

    def staged(self, fmt: str) -> Path:
        """Where the staged ``fmt`` ("mp3", "ogg") file of this track lives."""
        assert self.path is not None, "use Staging as a context manager"
        return self.path / f"{self.name}.{fmt}"

    def encode(self, wave: Waveform, tags: TrackTags) -> list[Path]:
        """Encode and tag ``wave`` (float ``[2, N]`` at 44.1 kHz) as staged MP3 and OGG; returns their paths."""
        if wave.sample_rate != TARGET_SAMPLE_RATE or wave.channels != TARGET_CHANNELS:
            raise ValueError(f"export needs 44.1 kHz stereo, got {wave.sample_rate} Hz x {wave.channels}")
        assert self.path is not None, "use Staging as a context manager"
        segment = _segment(wave)
        paths = []
        with _temporaries_in(self.path):
            for fmt in ("mp3", "ogg"):
                dest = self.staged(fmt)
                _encode(segment, self.ffmpeg, fmt, dest)
                try:
                    write_tags(dest, fmt, tags)
                except Exception as exc:  # noqa: BLE001 - mutagen raises many types
                    raise ExportError(f"could not tag {dest.name}: {exc}") from exc
                paths.append(dest)
                if fmt == "mp3":
                    faults.hook("encode")
        return paths

    def add_extra(self, filename: str) -> Path:
        """Reserve a staged path for a file published beside the audio (e.g. a preview PNG)."""
        assert self.path is not None, "use Staging as a context manager"
        extra = self.path / filename
        self._extras.append(extra)
        return extra

    def publish(
        self,
        expected_duration_s: float,
        *,
        overwrite: bool = False,
        sidecar: Callable[[list[ExportedFile]], dict[str, bytes]] | None = None,
    ) -> list[ExportedFile]:
        """Verify the staged MP3 and OGG, then move them (and extras) into the destination.

        ``sidecar``, when given, is called with the verified files (final paths)
        and returns ``{file name: content}`` of extra files (the provenance
        record) that are staged too and moved into place *after* the audio, in
        one step that SIGINT/SIGTERM cannot split: the record's presence marks a
        complete take.

        Returns:
            ``[mp3, ogg]`` as read back before the move, with their final paths.

        Raises:
            ExportError: a file is not as promised, or the move failed.
            FileExistsError: an output exists and ``overwrite`` is False.
        """
        finals = output_paths(self.out_dir, self.name)
        if not overwrite:
            existing = [p for p in finals.values() if p.exists()]
            if existing:
                raise FileExistsError(existing[0])
        staged = {fmt: inspect_file(self.staged(fmt), fmt) for fmt in ("mp3", "ogg")}
        for f in staged.values():
            _verify(f, expected_duration_s)
        done = [ExportedFile(**{**staged[fmt].__dict__, "path": finals[fmt]}) for fmt in ("mp3", "ogg")]
        moves = [(staged[fmt].path, finals[fmt]) for fmt in ("mp3", "ogg")]
        moves += [(extra, self.out_dir / extra.name) for extra in self._extras if extra.exists()]
        for fname, content in (sidecar(done) if sidecar else {}).items():
            moves.append((_write_staged(self.path / fname, content), self.out_dir / fname))
        faults.hook("commit")
        with faults.signals_deferred():
            for src, dest in moves:
                try:
                    os.replace(src, dest)
                except OSError as exc:
                    raise ExportError(f"could not move {dest.name} into {self.out_dir}: {exc.strerror}") from exc
        return done


def export_track(
    wave: Waveform,
    out_dir: Path,
    name: str,
    tags: TrackTags,
    *,
    ffmpeg: Ffmpeg,
    overwrite: bool = False,
    sidecar: Callable[[list[ExportedFile]], dict[str, bytes]] | None = None,
) -> list[ExportedFile]:
    """Encode ``wave`` (float32 ``[2, N]`` at 44.1 kHz) to ``NAME.mp3`` and ``NAME.ogg`` in ``out_dir``.

    Both files are encoded, tagged and verified in a staging folder, then moved
    into place. On any failure nothing in ``out_dir`` changes.

    Returns:
        ``[mp3, ogg]`` as :class:`ExportedFile`, read back from their final paths.

    Raises:
        ExportError: encoding, tagging, verification or the final move failed.
        FileExistsError: an output exists and ``overwrite`` is False.

    ``sidecar``, when given, is called with the verified files (final paths) and
    returns ``{file name: content}`` of extra files (the provenance record) that
    are staged too and moved into place *after* the audio, in one step that
    SIGINT/SIGTERM cannot split.
    """
    if not overwrite:
        existing = [p for p in output_paths(out_dir, name).values() if p.exists()]
        if existing:
            raise FileExistsError(existing[0])
    with Staging(out_dir, name, ffmpeg=ffmpeg) as staging:
        staging.encode(wave, tags)
        return staging.publish(wave.duration_s, overwrite=overwrite, sidecar=sidecar)
