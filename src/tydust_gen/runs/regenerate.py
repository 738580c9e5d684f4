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
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tydust_gen.base.errors import MelodyError, UsageError
from tydust_gen.base.prompts import Section, TrackSpec
from tydust_gen.base.variations import variation_names
from tydust_gen.export import staging as export
from tydust_gen.export.encode import FFMPEG_TIMEOUT_S
from tydust_gen.export.ffmpeg import Ffmpeg, check_encoders, find_ffmpeg
from tydust_gen.export.verify import ExportedFile, sha256_file
from tydust_gen.runs import provenance
from tydust_gen.runs.batch import RunListener, render_planned
from tydust_gen.runs.pipeline import Continuation, MelodySource, TrackPlan, TrackResult


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
        sections=tuple(
            Section(float(t["at"]), t["prompt"], t.get("guidance_scale")) for t in data["prompt"].get("sections") or ()
        ),
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
    continuation = continuation_from_record(data, record_file)
    melody = melody_from_record(data, record_file)
    return TrackPlan(spec, settings, bool(data.get("seed_was_random")), dest, outputs, mastering, takes, continuation, melody)


def _find_recorded_input(facts: dict[str, Any], record_file: Path) -> tuple[Path, Path | None]:
    """``(recorded path, the file with the recorded sha256 or None)`` for an input file a record names
    (``facts``: ``{"path", "sha256"}``): looked for where it was, then beside the record (a moved folder)."""
    recorded = Path(facts["path"])
    candidates = [recorded, record_file.parent / recorded.name]
    return recorded, next((p for p in candidates if p.is_file() and sha256_file(p) == facts["sha256"]), None)


def continuation_from_record(data: dict[str, Any], record_file: Path) -> Continuation | None:
    """The continued audio a record names, found where it was or beside the record (a moved folder).

    Raises:
        UsageError: the audio is gone, or its sha256 is not the recorded one (the take would differ).
    """
    facts = data.get("continuation")
    if not facts:
        return None
    recorded, found = _find_recorded_input(facts, record_file)
    if found is None:
        raise UsageError(
            f"{record_file} continues {recorded}, which is missing or has changed since (sha256 differs); "
            "put the original audio back to regenerate this take"
        )
    return Continuation(path=found, context_s=float(facts["context_s"]), track=facts.get("track"))


def melody_from_record(data: dict[str, Any], record_file: Path) -> MelodySource | None:
    """The melody a record names, found where it was or beside the record (a moved folder), with its recorded sha256.

    Raises:
        MelodyError: the file is gone, or its sha256 is not the recorded one (the take would differ).
    """
    facts = data.get("melody")
    if not facts:
        return None
    recorded, found = _find_recorded_input(facts, record_file)
    if found is None:
        raise MelodyError(
            f"{record_file} follows the melody {recorded}, which is missing or has changed since (sha256 differs); "
            "put the original melody back to regenerate this take"
        )
    return MelodySource(path=found)


def decoded_sha256(ffmpeg: Ffmpeg, path: Path) -> str | None:
    """sha256 of a file's samples decoded to 16-bit PCM by ffmpeg (None if it cannot be decoded)."""
    try:
        proc = subprocess.run(
            [ffmpeg.path, "-hide_banner", "-loglevel", "error", "-i", str(path), "-f", "s16le", "-"],
            capture_output=True,
            timeout=FFMPEG_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return hashlib.sha256(proc.stdout).hexdigest() if proc.returncode == 0 else None


def compare(data: dict[str, Any], record_file: Path, new_files: list[ExportedFile], ffmpeg: Ffmpeg) -> list[Comparison]:
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


@dataclass
class Regenerated:
    """A take made again from its record.

    Attributes:
        result: the new take.
        comparisons: how each new file compares with the recorded one (empty when the take failed).
        total_s: seconds from reading the record to the verified files.
    """

    result: TrackResult
    comparisons: list[Comparison]
    total_s: float


def regenerate_take(
    record_file: Path,
    *,
    out_dir: Path | None = None,
    model_ref: str | None = None,
    device_name: str | None = None,
    force: bool = False,
    listener: RunListener | None = None,
) -> Regenerated:
    """Make the take recorded in ``record_file`` again (same prompt, settings, seed, model, device, dtype).

    ``model_ref`` / ``device_name`` override the recorded ones (the new take may then differ).

    Raises:
        UsageError: the record is unreadable or the outputs exist without ``force``.
        EnvironmentProblem, TrackBusyError: as for a batch.
    """
    import torch

    from tydust_gen.base import faults
    from tydust_gen.model import loading
    from tydust_gen.model.backends import make_backend
    from tydust_gen.runs.locks import TrackLocks

    listener = listener or RunListener()
    started = time.perf_counter()
    data = provenance.read_record(record_file)
    plan = plan_from_record(data, record_file, out_dir, force=force)
    ffmpeg = find_ffmpeg()
    check_encoders(ffmpeg)
    source = loading.resolve_source(model_ref or data["model"]["ref"])
    if plan.melody is not None and loading.peek_family(source) not in (None, "melody"):
        from tydust_gen.model.melody import melody_unsupported_message

        raise MelodyError(melody_unsupported_message(source.ref))
    identity = provenance.model_identity(source)
    if not provenance.same_model(data.get("model", {}), identity):
        listener.warn(f"{source.ref} is not the recorded model; the new take will differ")
    device, _ = loading.resolve_device(device_name or data.get("device", "auto"))
    dtype = getattr(torch, data.get("dtype", ""), None) if device_name is None else None
    with TrackLocks() as track_locks:
        track_locks.acquire_takes(plan.out_dir, plan.spec.name, plan.takes)
        listener.info(f"loading {source.ref} on {device}…")
        faults.hook("loading")
        loaded = loading.load_model(source, device, dtype=dtype if isinstance(dtype, torch.dtype) else None)
        takes = render_planned(
            loaded, plan, backend=make_backend(plan.settings.backend, self_check=True, warn=listener.warn), ffmpeg=ffmpeg, force=force,
            identity=identity, listener=listener,
        )  # fmt: skip
    wanted = data.get("take") or plan.spec.name
    result = next((r for r in takes if r.name == wanted), takes[0])
    verdicts = compare(data, record_file, result.files, ffmpeg) if result.ok else []
    return Regenerated(result, verdicts, time.perf_counter() - started)
