"""``tydust-gen list``: each track in the prompts folder, its length, and whether its take is current.

It also sweeps the output folders it looks at for staging folders that killed
runs left (the rule is in ``runs/locks.py``) and reports those it could not
remove, so they do not stay unnoticed forever.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tydust_gen.base.errors import PromptError, TydustError
from tydust_gen.base.prompts import available_tracks, load_track
from tydust_gen.base.settings import resolve_mastering, resolve_settings
from tydust_gen.base.variations import variation_names
from tydust_gen.export import staging as export
from tydust_gen.model.melody import MELODY_BACKEND
from tydust_gen.runs import provenance
from tydust_gen.runs.locks import Leftover, sweep_staging
from tydust_gen.runs.pipeline import default_out_dir, plan_continuation, plan_melody


@dataclass(frozen=True)
class TrackStatus:
    """One row of ``tydust-gen list``.

    Attributes:
        name: track name.
        duration_s: seconds (prompt file, else the default); None when the file is invalid.
        out_dir: where its outputs go.
        status: "current", "missing", "stale", "no record" or "invalid".
        detail: why it is stale or invalid ("" otherwise).
    """

    name: str
    duration_s: float | None
    out_dir: Path | None
    status: str
    detail: str = ""


def track_status(name: str, prompts_dir: Path, out_dir: Path | None, model: dict[str, Any] | None) -> TrackStatus:
    try:
        spec = load_track(name, prompts_dir)
        settings = resolve_settings({}, spec.settings)
        mastering = resolve_mastering({}, spec.settings, settings.duration_s)
    except TydustError as exc:
        return TrackStatus(name, None, None, "invalid", str(exc))
    dest = out_dir if out_dir is not None else default_out_dir(spec)
    take = variation_names(name, mastering.variations)[0]  # with variations, the first take stands for the batch
    outputs = export.output_paths(dest, take)
    record = provenance.load_if_present(dest, take)
    if record is None:
        if any(p.exists() for p in outputs.values()):
            return TrackStatus(name, settings.duration_s, dest, "no record", "outputs without NAME.json (older or foreign files)")
        return TrackStatus(name, settings.duration_s, dest, "missing")
    if record.get("model_family") == "melody" and "backend" not in spec.settings:
        settings = replace(settings, backend=MELODY_BACKEND)  # what a run picks for it (batch.fit_model_family)
    try:
        # the melody and the continued audio the prompt file names are inputs of the take too
        melody = plan_melody(spec, {})
        continuation = plan_continuation(spec, {}, dest)
    except TydustError as exc:
        return TrackStatus(name, settings.duration_s, dest, "invalid", str(exc))
    why = provenance.check_current(
        record, spec=spec, settings=settings, mastering=mastering, seed_given=settings.seed is not None, out_dir=dest,
        model=model, melody=melody.path if melody is not None else None,
        continuation=continuation.path if continuation is not None else None,
    )
    if why is None:
        return TrackStatus(name, settings.duration_s, dest, "current")
    return TrackStatus(name, settings.duration_s, dest, "stale", why)


@dataclass(frozen=True)
class Listing:
    """What ``tydust-gen list`` reports.

    Attributes:
        tracks: one row per prompt file, sorted by name.
        leftovers: stale staging folders in those output folders that could not be removed.
    """

    tracks: list[TrackStatus]
    leftovers: list[Leftover] = field(default_factory=list)


def list_tracks(prompts_dir: Path, out_dir: Path | None, model: dict[str, Any] | None) -> list[TrackStatus]:
    """Status of every track that has a prompt file (sorted by name)."""
    return [track_status(n, prompts_dir, out_dir, model) for n in available_tracks(prompts_dir)]


def sweep_output_folders(rows: list[TrackStatus], out_dir: Path | None) -> list[Leftover]:
    """Sweep stale staging folders in every output folder of ``rows`` (and ``out_dir``); what stays."""
    folders = {r.out_dir for r in rows if r.out_dir is not None} | ({out_dir} if out_dir is not None else set())
    return [left for folder in sorted(folders) for left in sweep_staging(folder)]


def list_prompts_folder(prompts_dir: Path, out_dir: Path | None, model_ref: str) -> Listing:
    """``list``: every track of ``prompts_dir``, judged against ``model_ref`` when that model is available here.

    The output folders are swept of stale staging folders on the way; the
    ones that could not be removed are in :attr:`Listing.leftovers`.

    Raises:
        PromptError: ``prompts_dir`` is not a folder.
    """
    from tydust_gen.model.loading import resolve_source

    if not prompts_dir.is_dir():
        raise PromptError(f"prompts folder {prompts_dir}/ does not exist; create it or pass --prompts-dir")
    try:
        identity: dict[str, Any] | None = provenance.model_identity(resolve_source(model_ref))
    except TydustError:
        identity = None  # model unavailable here: judge the takes by prompt, settings and files only
    rows = list_tracks(prompts_dir, out_dir, identity)
    return Listing(rows, sweep_output_folders(rows, out_dir))
