"""Regenerate a take from its provenance record, and tell whether it came out the same.

The record gives the prompt text, every setting (the seed included), the model,
device and dtype; generating again with those on the same device and dtype gives
the same tokens, so the same samples. MP3 files then match byte for byte; an Ogg
stream carries a random serial number, so OGG files are compared by their
decoded samples when their bytes differ.
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import export, provenance
from .errors import UsageError
from .pipeline import TrackPlan
from .prompts import TrackSpec
from .variations import variation_names


@dataclass(frozen=True)
class Comparison:
    """How one regenerated file compares with the recorded one.

    Attributes:
        format: "mp3" or "ogg".
        verdict: "identical" (same sha256), "same audio" (same decoded samples),
            or "differs".
    """

    format: str
    verdict: str


def plan_from_record(data: dict[str, Any], record_file: Path, out_dir: Path | None, *, force: bool) -> TrackPlan:
    """A :class:`TrackPlan` that repeats the recorded take into ``out_dir`` (default: beside the record).

    Raises:
        UsageError: outputs exist and ``force`` is False; the record has no seed.
    """
    meta = data.get("metadata", {})
    spec = TrackSpec(
        name=data["track"],
        prompt=data["prompt"]["text"],
        path=Path(data["prompt"]["file"]),
        title=meta.get("title") or data["track"],
        genre=meta.get("genre"),
        folder=meta.get("folder"),
        bpm=meta.get("bpm"),
    )
    settings = provenance.settings_from_record(data)
    mastering = provenance.mastering_from_record(data)
    if settings.seed is None:
        raise UsageError(f"{record_file} has no seed; the take cannot be repeated")
    dest = out_dir if out_dir is not None else record_file.parent
    export.check_output_dir(dest)
    takes = tuple(variation_names(spec.name, mastering.variations))
    take = data.get("take") or spec.name
    if mastering.variations > 1 and take in takes:
        # A take of a batch is made again on its own: its record holds its own seed, and the
        # fast backends sample each take of a batch from a stream seeded with exactly that.
        takes = (take,)
        mastering = replace(mastering, variations=1)
    existing = [p for take in takes for p in export.output_paths(dest, take).values() if p.exists()]
    if existing and not force:
        raise UsageError(f"{existing[0]} already exists; pass --out-dir DIR to regenerate elsewhere, or --force to replace it")
    outputs = export.output_paths(dest, takes[0])
    return TrackPlan(spec, settings, bool(data.get("seed_was_random")), dest, outputs, mastering, takes)


def decoded_sha256(ffmpeg: export.Ffmpeg, path: Path) -> str | None:
    """sha256 of a file's samples decoded to 16-bit PCM by ffmpeg (None if it cannot be decoded)."""
    try:
        proc = subprocess.run(
            [ffmpeg.path, "-hide_banner", "-loglevel", "error", "-i", str(path), "-f", "s16le", "-"],
            capture_output=True,
            timeout=export.FFMPEG_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return hashlib.sha256(proc.stdout).hexdigest() if proc.returncode == 0 else None


def compare(data: dict[str, Any], record_file: Path, new_files: list[export.ExportedFile], ffmpeg: export.Ffmpeg) -> list[Comparison]:
    """Compare regenerated files with the recorded ones (decoding both when only the bytes differ)."""
    recorded = {f["format"]: f for f in data.get("files", [])}
    out = []
    for f in new_files:
        old = recorded.get(f.format)
        if old is None:
            out.append(Comparison(f.format, "differs"))
            continue
        if old["sha256"] == f.sha256:
            out.append(Comparison(f.format, "identical"))
            continue
        original = record_file.parent / old["path"]
        same = (
            original.is_file()
            and original.resolve() != f.path.resolve()
            and decoded_sha256(ffmpeg, original) is not None
            and decoded_sha256(ffmpeg, original) == decoded_sha256(ffmpeg, f.path)
        )
        out.append(Comparison(f.format, "same audio" if same else "differs"))
    return out
