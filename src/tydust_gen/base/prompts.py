"""Prompt stage: find and parse a track's prompt file.

A track ``NAME`` is ``<prompts dir>/NAME.toml`` or ``<prompts dir>/NAME.txt``.

* ``.txt``: the whole file (stripped) is the prompt.
* ``.toml``: a ``prompt`` string plus optional metadata and settings::

      prompt = "Darkwave peak intensity music ..."
      title = "Phase 4 - Peak"      # tag; default: the track name
      genre = "darkwave"            # tag, and the output sub-folder assets/music/<genre>/
      folder = "boss"               # output sub-folder instead of the genre
      bpm = 124                     # tag, and the prior of the loop's tempo detection
      duration = 90                 # seconds
      seed = 1234
      temperature = 1.0
      top_k = 250
      top_p = 0.0                   # 0 = off
      guidance_scale = 3.0
      window = 30                   # seconds per generation pass
      stride = 18                   # seconds each further pass advances
      do_sample = true
      loudness = -14                # LUFS, or "off"
      true_peak = -1.0              # dBTP ceiling on the encoded files
      fade_in = 0.0                 # seconds, equal-power
      fade_out = 2.0                # seconds, equal-power
      loop = false                  # seamless loop with LOOPSTART/LOOPLENGTH tags, cut on the bar
      bars = 8                      # loop length in bars (default: the whole bars nearest duration)
      meter = "4/4"                 # time signature the bars are counted in
      variations = 1                # takes in one batched generation
      preview = false               # also write NAME.png

Unknown keys and malformed TOML are errors naming the file and line. Having both
``NAME.toml`` and ``NAME.txt`` is an error too: which one wins would be a guess.
Text that the MP3 and OGG tags could not carry as typed is refused here, before
the model loads (:func:`check_tag_text`).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tydust_gen.base.errors import PromptError, SettingsError
from tydust_gen.base.settings import CONDITIONING_PARSERS, MASTERING_PARSERS, SETTING_PARSERS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROMPT_SUFFIXES = (".toml", ".txt")
DEFAULT_PROMPTS_DIR = "prompts"
METADATA_KEYS = ("prompt", "title", "genre", "folder", "bpm")
ALLOWED_KEYS = METADATA_KEYS + tuple(SETTING_PARSERS) + tuple(MASTERING_PARSERS) + tuple(CONDITIONING_PARSERS)
_TRACK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# ID3 reads a genre that is a number, "RX", "CR", or starts with "(13)" / "((" as an ID3v1
# genre code (mutagen rewrites "13" to "Pop" on save, players show "Pop"). \d is any decimal digit.
_ONE_LINE_FIELDS = ("title", "genre")  # ID3 text frames; the comment (COMM) may hold line breaks
_ID3_GENRE_CODE = re.compile(r"\d+|RX|CR|\((?:\d+|RX|CR)\).*|\(\(.*", re.DOTALL)


@dataclass(frozen=True)
class TrackSpec:
    """One track as its prompt file describes it.

    Attributes:
        name: the track name (file stem), also the output file stem.
        prompt: the text prompt given to MusicGen.
        path: the prompt file.
        title: title tag.
        genre: genre tag (None if not given).
        folder: output sub-folder under the default output root (None: none).
        bpm: tempo tag (None if not given).
        settings: generation settings from the file, already validated
            (keys of :data:`tydust_gen.base.settings.SETTING_PARSERS`).
    """

    name: str
    prompt: str
    path: Path
    title: str
    genre: str | None = None
    folder: str | None = None
    bpm: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def available_tracks(prompts_dir: Path) -> list[str]:
    """Sorted names of the tracks that have a prompt file in ``prompts_dir``."""
    if not prompts_dir.is_dir():
        return []
    names = {p.stem for p in prompts_dir.iterdir() if p.suffix in PROMPT_SUFFIXES and p.is_file()}
    return sorted(names)


def _tracks_hint(prompts_dir: Path) -> str:
    names = available_tracks(prompts_dir)
    if not names:
        return f"{prompts_dir}/ has no .toml or .txt prompt files"
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return f"tracks in {prompts_dir}/: {shown}"


def find_prompt_file(name: str, prompts_dir: Path) -> Path:
    """Locate the prompt file of track ``name``.

    Raises:
        PromptError: bad name, no file, or both .toml and .txt.
    """
    if not _TRACK_NAME.fullmatch(name):
        raise PromptError(
            f"track name {name!r} is not valid: use letters, digits, '_', '-' and '.', e.g. phase4_peak"
        )
    if not prompts_dir.is_dir():
        raise PromptError(f"prompts folder {prompts_dir}/ does not exist; create it or pass --prompts-dir")
    found = [prompts_dir / f"{name}{suffix}" for suffix in PROMPT_SUFFIXES]
    broken = [p for p in found if p.is_symlink() and not p.exists()]
    if broken:
        raise PromptError(f"{broken[0]} is a broken symbolic link; point it at a prompt file or remove it")
    found = [p for p in found if p.exists()]
    if not found:
        raise PromptError(f"no prompt file for track {name!r} ({prompts_dir}/{name}.toml or .txt); {_tracks_hint(prompts_dir)}")
    if len(found) > 1:
        raise PromptError(f"track {name!r} has both {found[0].name} and {found[1].name} in {prompts_dir}/; keep only one")
    if not found[0].is_file():
        raise PromptError(f"{found[0]} is not a regular file")
    return found[0]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise PromptError(f"cannot read {path}: {exc.strerror}") from None


def _clean_prompt(text: str, path: Path) -> str:
    prompt = " ".join(text.split())
    if not prompt:
        raise PromptError(f"{path} has an empty prompt; write a description of the music in it")
    return prompt


def _str_field(data: dict[str, Any], key: str, path: Path) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise PromptError(f"{path}: {key} must be a non-empty string, got {value!r}")
    return value.strip()


def check_tag_text(field_name: str, value: str, path: Path) -> None:
    """Refuse text the MP3 (ID3v2.4) and OGG (Vorbis comment) tags cannot carry as typed.

    The prompt, title and genre are written into both files' tags (the prompt
    inside the comment) and must read back exactly as the prompt file gives
    them. These cannot:

    * U+0000 (NUL): ID3v2.4 separates the values of a text frame with NUL, so
      "a<NUL>b" reads back as two values, "a" and "b".
    * text that is not valid Unicode (lone surrogates): both tags store UTF-8.
    * a line break (CR or LF) in the title or genre: ID3 text frames (TIT2,
      TCON) are one line ("newline characters are forbidden" unless a frame
      allows them); mutagen reads a genre only up to its first LF. The prompt
      has its whitespace collapsed, so it never holds one.
    * a genre ID3 reads as an ID3v1 genre code: a number ("13" shows as "Pop"),
      "RX", "CR", or text starting with "(13)", "(RX)", "(CR)" or "((".

    Everything else (any script, emoji, right-to-left text, quotes, tabs and
    other control characters, words such as "Info" or "ID3") is stored as is.

    Raises:
        PromptError: names the file, the field and what to change.
    """
    if "\x00" in value:
        raise PromptError(
            f"{path}: {field_name} contains a NUL character (U+0000, at character {value.index(chr(0)) + 1}), "
            "which MP3 tags cannot store; remove it"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PromptError(
            f"{path}: {field_name} is not valid Unicode at character {exc.start + 1}; save the file as UTF-8 text"
        ) from None
    if field_name in _ONE_LINE_FIELDS and ("\n" in value or "\r" in value):
        raise PromptError(f"{path}: {field_name} contains a line break, which an MP3 {field_name} tag cannot hold; put it on one line")
    if field_name == "genre" and _ID3_GENRE_CODE.fullmatch(value):
        raise PromptError(
            f"{path}: genre {value!r} would show in players as an ID3 genre code, not as written; "
            'use a name (e.g. genre = "synthwave"), and folder = "..." if it names the output folder'
        )


def load_track(name: str, prompts_dir: Path | str = DEFAULT_PROMPTS_DIR) -> TrackSpec:
    """Read and validate track ``name`` from ``prompts_dir``.

    Raises:
        PromptError: missing/empty/malformed prompt file or unknown key.
        SettingsError: a setting in the file has a bad value (message names the file).
    """
    prompts_dir = Path(prompts_dir)
    path = find_prompt_file(name, prompts_dir)
    text = _read_text(path)
    if path.suffix == ".txt":
        prompt = _clean_prompt(text, path)
        check_tag_text("prompt", prompt, path)
        return TrackSpec(name=name, prompt=prompt, path=path, title=name)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PromptError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(ALLOWED_KEYS))
    if unknown:
        raise PromptError(
            f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"allowed: {', '.join(ALLOWED_KEYS)}"
        )
    if "prompt" not in data:
        raise PromptError(f'{path} has no prompt; add a line like prompt = "calm synth menu music"')
    if not isinstance(data["prompt"], str):
        raise PromptError(f"{path}: prompt must be a string")
    prompt = _clean_prompt(data["prompt"], path)
    genre = _str_field(data, "genre", path)
    folder = _str_field(data, "folder", path)
    title = _str_field(data, "title", path) or name
    for key, value in (("prompt", prompt), ("title", title), ("genre", genre)):
        if value is not None:
            check_tag_text(key, value, path)
    sub = folder or genre
    if sub is not None and not _FOLDER_NAME.fullmatch(sub):
        what = "folder" if folder else "genre"
        raise PromptError(f"{path}: {what} {sub!r} can't be a folder name; use letters, digits, '_', '-', '.'")
    bpm = data.get("bpm")
    if bpm is not None and (isinstance(bpm, bool) or not isinstance(bpm, (int, float)) or not 1 <= bpm <= 999):
        raise PromptError(f"{path}: bpm must be a number between 1 and 999, got {bpm!r}")
    settings: dict[str, Any] = {}
    for key, parser in {**SETTING_PARSERS, **MASTERING_PARSERS, **CONDITIONING_PARSERS}.items():
        if key in data:
            try:
                settings[key] = parser(data[key])
            except SettingsError as exc:
                raise SettingsError(f"{path}: {exc}") from None
    return TrackSpec(
        name=name,
        prompt=prompt,
        path=path,
        title=title,
        genre=genre,
        folder=sub,
        bpm=float(bpm) if bpm is not None else None,
        settings=settings,
    )
