"""Tags: what a player or game engine reads from the files.

Title, genre, comment (prompt, seed, model id) and BPM go into both files (ID3v2
in the MP3, Vorbis comments in the OGG); loop points go into the OGG as
``LOOPSTART`` / ``LOOPLENGTH`` (samples), the convention of RPG Maker,
GameMaker and Godot importers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tydust_gen.base.errors import ExportError, SettingsError
from pathlib import Path

LOOP_TAG_START = "LOOPSTART"  # Vorbis comment read by RPG Maker, GameMaker, Godot importers...


LOOP_TAG_LENGTH = "LOOPLENGTH"


@dataclass(frozen=True)
class LoopPoints:
    """Loop region of a file in sample frames at the file's rate (44.1 kHz here).

    Attributes:
        start: first sample of the loop.
        length: samples in the loop.
    """

    start: int
    length: int


def write_loop_tags(path: str | os.PathLike[str], loop_start: int, loop_length: int) -> None:
    """Write ``LOOPSTART`` / ``LOOPLENGTH`` Vorbis comments into an OGG Vorbis file.

    Values are sample positions (frames) at the file's sample rate, written as
    decimal strings, the convention game engines read. Other tags are kept.

    Args:
        path: an existing ``.ogg`` (Vorbis) file, rewritten in place by mutagen.
        loop_start: samples, >= 0.
        loop_length: samples, >= 1.

    Raises:
        SettingsError: negative start or non-positive length.
        ExportError: the file is not a readable OGG Vorbis file.
    """
    from mutagen import MutagenError
    from mutagen.oggvorbis import OggVorbis

    for name, value, low in (("loop start", loop_start, 0), ("loop length", loop_length, 1)):
        if isinstance(value, bool) or int(value) != value or value < low:
            raise SettingsError(f"{name} must be a whole number of samples >= {low}, got {value!r}")
    try:
        ogg = OggVorbis(os.fspath(path))
        ogg[LOOP_TAG_START] = str(int(loop_start))
        ogg[LOOP_TAG_LENGTH] = str(int(loop_length))
        ogg.save()
    except (MutagenError, OSError) as exc:
        raise ExportError(f"could not write loop tags to {path}: {exc}") from exc


def read_loop_tags(path: str | os.PathLike[str]) -> LoopPoints | None:
    """Read ``LOOPSTART`` / ``LOOPLENGTH`` from an OGG Vorbis file.

    Returns:
        :class:`LoopPoints`, or None when the file carries no loop tags.

    Raises:
        ExportError: the file is unreadable or a tag is not a whole number.
    """
    from mutagen import MutagenError
    from mutagen.oggvorbis import OggVorbis

    try:
        tags = OggVorbis(os.fspath(path)).tags or {}
    except (MutagenError, OSError) as exc:
        raise ExportError(f"could not read loop tags from {path}: {exc}") from exc
    start, length = tags.get(LOOP_TAG_START), tags.get(LOOP_TAG_LENGTH)
    if not start or not length:
        return None
    try:
        return LoopPoints(start=int(start[0]), length=int(length[0]))
    except ValueError as exc:
        raise ExportError(f"{path} has malformed loop tags {start!r}/{length!r}") from exc


@dataclass(frozen=True)
class TrackTags:
    """Metadata written into both files."""

    title: str
    genre: str | None
    comment: str
    bpm: float | None = None


def write_tags(path: Path, fmt: str, tags: TrackTags) -> None:
    """Write title/genre/comment/bpm so players show them (ID3 COMM, Vorbis COMMENT)."""
    if fmt == "mp3":
        from mutagen.id3 import COMM, ID3, TBPM, TCON, TIT2, ID3NoHeaderError

        try:
            id3 = ID3(path)
        except ID3NoHeaderError:
            id3 = ID3()
        # Players show COMM (language, empty description) as "the comment"; pydub's tags={"comment": ...}
        # would have written TXXX:comment, which they don't, so none may linger.
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
