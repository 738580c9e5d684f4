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
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from tydust_gen.audio.resample import TARGET_CHANNELS, TARGET_SAMPLE_RATE
from tydust_gen.base import faults, signals
from tydust_gen.base.errors import ExportError, OutputDirError
from tydust_gen.base.waveform import Waveform
from tydust_gen.export.encode import encode_formats, pcm_segment
from tydust_gen.export.ffmpeg import Ffmpeg
from tydust_gen.export.tags import TrackTags, write_tags
from tydust_gen.export.verify import ExportedFile, check_promises, inspect_file

STAGING_PREFIX = ".tydust-staging-"  # then the take's name, "-", and tempfile's random letters (no "-")


def staging_folders(out_dir: Path) -> list[tuple[Path, str]]:
    """Every staging folder in ``out_dir`` with the take it was building, as ``(folder, take)``, sorted.

    Whether one is stale is for the caller holding the track locks to decide
    (``runs/locks.py``: a folder is stale when no live process holds the lock
    of a track that could own its take). Links are never listed.
    """
    try:
        entries = list(os.scandir(out_dir))
    except OSError:
        return []
    found = []
    for entry in entries:
        if not entry.name.startswith(STAGING_PREFIX):
            continue
        take, dash, _ = entry.name[len(STAGING_PREFIX) :].rpartition("-")
        with contextlib.suppress(OSError):
            if dash and take and entry.is_dir(follow_symlinks=False):
                found.append((Path(entry.path), take))
    return sorted(found)


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


def make_output_dir(out_dir: Path) -> None:
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
    Only a SIGKILL (or a power cut) can leave it behind; callers hold the
    track's lock while a Staging is open, so the next run that locks a track
    in this folder recognises it as stale and removes it (``runs/locks.py``).
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
        make_output_dir(self.out_dir)
        self.path = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{self.name}-", dir=self.out_dir))
        return self

    def __exit__(self, *exc_info) -> None:
        if self.path is not None:
            with signals.deferred():  # a second Ctrl-C must not leave the staging folder half removed
                shutil.rmtree(self.path, ignore_errors=True)

    def staged(self, fmt: str) -> Path:
        """Where the staged ``fmt`` ("mp3", "ogg") file of this track lives."""
        assert self.path is not None, "use Staging as a context manager"
        return self.path / f"{self.name}.{fmt}"

    def encode(
        self,
        wave: Waveform,
        tags: TrackTags,
        *,
        then: Callable[[Path], Any] | None = None,
        watch: Callable[[str, Path], Any] | None = None,
    ) -> list[Any]:
        """Encode and tag ``wave`` (float ``[2, N]`` at 44.1 kHz) as staged MP3 and OGG; returns their paths.

        ``then``, when given, runs on each file in its encoding thread as soon as it is tagged (the
        mastering stage measures the MP3 while the slower OGG is still encoding), and its results are
        returned instead of the paths. ``watch(fmt, dest)``, when given, may return a follower of the
        encoder's output while it is written (``EncodedPeaks.watch``: the OGG is measured as it is
        encoded; see :func:`~tydust_gen.export.encode.encode_segment`).
        """
        if wave.sample_rate != TARGET_SAMPLE_RATE or wave.channels != TARGET_CHANNELS:
            raise ValueError(f"export needs 44.1 kHz stereo, got {wave.sample_rate} Hz x {wave.channels}")
        assert self.path is not None, "use Staging as a context manager"
        segment = pcm_segment(wave)

        def tag(fmt: str, dest: Path) -> Any:
            try:
                write_tags(dest, fmt, tags)
            except Exception as exc:  # noqa: BLE001 - mutagen raises many types
                raise ExportError(f"could not tag {dest.name}: {exc}") from exc
            return dest if then is None else then(dest)

        def each_done(fmt: str) -> None:
            if fmt == "mp3":
                faults.hook("encode")  # the MP3 is whole; the OGG may still be encoding

        # Both formats at once; pydub's temporaries (set process-wide) go to this folder until both are done.
        with _temporaries_in(self.path):
            return encode_formats(
                segment, self.ffmpeg, [(fmt, self.staged(fmt)) for fmt in ("mp3", "ogg")],
                then=tag, each_done=each_done, watch=watch,
            )  # fmt: skip

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
            check_promises(f, expected_duration_s)
        done = [ExportedFile(**{**staged[fmt].__dict__, "path": finals[fmt]}) for fmt in ("mp3", "ogg")]
        moves = [(staged[fmt].path, finals[fmt]) for fmt in ("mp3", "ogg")]
        moves += [(extra, self.out_dir / extra.name) for extra in self._extras if extra.exists()]
        for fname, content in (sidecar(done) if sidecar else {}).items():
            moves.append((_write_staged(self.path / fname, content), self.out_dir / fname))
        faults.hook("commit")
        with signals.deferred():
            for index, (src, dest) in enumerate(moves):
                try:
                    os.replace(src, dest)
                except OSError as exc:
                    raise ExportError(f"could not move {dest.name} into {self.out_dir}: {exc.strerror}") from exc
                if index == 0:
                    faults.hook("commit-held")  # a test's signal lands between the renames
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
