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
      melody = "themes/boss.ogg"    # a melody model follows this tune (relative to this file's folder)

      [[section]]                   # optional: the track moves through sections (see below)
      at = 20                       # seconds from the start
      prompt = "the build: drums enter, rising synth arpeggio"
      guidance_scale = 4.0          # optional, this section's own

Sections: each ``[[section]]`` table starts at ``at`` seconds and lasts until
the next one (or the end). Generation puts a window boundary at every section
start, and each window is conditioned on the section it produces while its
audio context carries across, so the music changes without a cut. A top-level
``prompt`` is then optional: it plays from 0 s until the first section; without
one the first section must start at 0. Sections are listed in time order, at
least :data:`MIN_SECTION_S` apart, and each start must fall inside the track
(checked against the duration when the run is planned, :func:`check_sections`).

Unknown keys and malformed TOML are errors naming the file and line. Having both
``NAME.toml`` and ``NAME.txt`` is an error too: which one wins would be a guess.
Text that the MP3 and OGG tags could not carry as typed is refused here, before
the model loads (:func:`check_tag_text`).
"""

from __future__ import annotations

import math
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
SECTION_TABLE = "section"  # [[section]]
SECTION_KEYS = ("at", "prompt", "guidance_scale")
MIN_SECTION_S = 1.0  # seconds; a shorter section would be a window of a few frames, no musical change
ALLOWED_KEYS = METADATA_KEYS + tuple(SETTING_PARSERS) + tuple(MASTERING_PARSERS) + tuple(CONDITIONING_PARSERS) + (SECTION_TABLE,)
_TRACK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# ID3 reads a genre that is a number, "RX", "CR", or starts with "(13)" / "((" as an ID3v1
# genre code (mutagen rewrites "13" to "Pop" on save, players show "Pop"). \d is any decimal digit.
_ONE_LINE_FIELDS = ("title", "genre")  # ID3 text frames; the comment (COMM) may hold line breaks
_ID3_GENRE_CODE = re.compile(r"\d+|RX|CR|\((?:\d+|RX|CR)\).*|\(\(.*", re.DOTALL)


@dataclass(frozen=True)
class Section:
    """One stretch of a track with its own prompt.

    Attributes:
        at: start, in seconds from the start of the track.
        prompt: the text the windows of this section are conditioned on.
        guidance_scale: this section's classifier-free guidance weight (None: the track's).
    """

    at: float
    prompt: str
    guidance_scale: float | None = None


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
        sections: the track's sections in time order, the first at 0 s (a top-level
            prompt becomes that first section); empty for a one-prompt track. ``prompt``
            is then the first section's prompt.
    """

    name: str
    prompt: str
    path: Path
    title: str
    genre: str | None = None
    folder: str | None = None
    bpm: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    sections: tuple[Section, ...] = ()

    @property
    def described(self) -> str:
        """The prompt as the tags and messages give it: with sections, each one's start and prompt."""
        if not self.sections:
            return self.prompt
        return " / ".join(f"[{s.at:g} s] {s.prompt}" for s in self.sections)


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
    prompt = None
    if "prompt" in data:
        if not isinstance(data["prompt"], str):
            raise PromptError(f"{path}: prompt must be a string")
        prompt = _clean_prompt(data["prompt"], path)
    sections = _parse_sections(data.get(SECTION_TABLE), prompt, path) if SECTION_TABLE in data else ()
    if prompt is None and not sections:
        raise PromptError(f'{path} has no prompt; add a line like prompt = "calm synth menu music"')
    if prompt is None:
        prompt = sections[0].prompt
    genre = _str_field(data, "genre", path)
    folder = _str_field(data, "folder", path)
    title = _str_field(data, "title", path) or name
    for key, value in (("prompt", prompt), ("title", title), ("genre", genre)):
        if value is not None:
            check_tag_text(key, value, path)
    for number, section in enumerate(sections, start=1):
        check_tag_text(f"section {number}'s prompt", section.prompt, path)
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
        sections=sections,
    )


def _parse_sections(raw: Any, top_prompt: str | None, path: Path) -> tuple[Section, ...]:
    """The ``[[section]]`` tables, checked and in order, with a top-level prompt as a first section at 0 s."""
    example = '[[section]] tables, e.g.\n[[section]]\nat = 20\nprompt = "the build"'
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise PromptError(f"{path}: section must be {example.splitlines()[0]} tables with at and prompt")
    if not raw:
        raise PromptError(f"{path}: section is empty; add [[section]] tables with at and prompt, or remove it")
    sections = [Section(0.0, top_prompt)] if top_prompt is not None else []
    for number, table in enumerate(raw, start=1):
        where = f"{path}: section {number}"
        unknown = sorted(set(table) - set(SECTION_KEYS))
        if unknown:
            raise PromptError(f"{where} has unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; allowed: {', '.join(SECTION_KEYS)}")
        at = table.get("at")
        if at is None:
            raise PromptError(f"{where} has no start; add at = SECONDS")
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at) or at < 0:
            raise PromptError(f"{where}: at must be a number of seconds, 0 or more, got {at!r}")
        text = table.get("prompt")
        if text is None:
            raise PromptError(f'{where} (at {at:g} s) has no prompt; add prompt = "..."')
        if not isinstance(text, str) or not text.split():
            raise PromptError(f"{where} (at {at:g} s) has an empty prompt; describe the music of that section")
        guidance = None
        if "guidance_scale" in table:
            try:
                guidance = SETTING_PARSERS["guidance_scale"](table["guidance_scale"])
            except SettingsError as exc:
                raise SettingsError(f"{where}: {exc}") from None
        section = Section(float(at), " ".join(text.split()), guidance)
        if sections:
            before = sections[-1]
            if section.at <= before.at:
                what = "the top-level prompt, which plays from 0 s" if top_prompt is not None and len(sections) == 1 else f"the section before it at {before.at:g} s"
                raise PromptError(
                    f"{where} starts at {section.at:g} s, not after {what}; sections must not overlap: list them in time order"
                    + ("" if before.at else ", or remove the top-level prompt")
                )
            if section.at - before.at < MIN_SECTION_S:
                raise PromptError(f"{where} starts {section.at - before.at:g} s after the one before; sections must be at least {MIN_SECTION_S:g} s long")
        elif section.at > 0:
            raise PromptError(
                f"{where} starts at {section.at:g} s and nothing plays before it; start the first section at 0, "
                "or add a top-level prompt for the opening"
            )
        sections.append(section)
    return tuple(sections)


def check_sections(spec: TrackSpec, duration_s: float) -> None:
    """Refuse sections that start at or past the end of a track of ``duration_s`` seconds (or end within a second of it).

    Raises:
        PromptError: names the prompt file, the section and the duration.
    """
    for section in spec.sections:
        if section.at > 0 and section.at > duration_s - MIN_SECTION_S:
            raise PromptError(
                f"{spec.path}: the section at {section.at:g} s starts past the end of the {duration_s:g} s track "
                f"(sections need {MIN_SECTION_S:g} s before the end); use a longer --duration or an earlier at"
            )
