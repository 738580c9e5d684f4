"""Batch semantics shared by ``generate`` and ``regenerate``: which tracks run, which are skipped.

Policy (never lose a take): outputs that exist are refused unless ``--force``.
With ``--skip-existing`` a track whose take is complete and current — its
``NAME.json`` matches the prompt file hash, every setting (the seed only when
one was given) and the model, and both files still have their recorded size and
sha256 — is skipped; one that exists but is not current is still refused
without ``--force``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import export, provenance
from .errors import UsageError
from .pipeline import TrackPlan, TrackResult
from .prompts import available_tracks
from .variations import variation_seed


@dataclass(frozen=True)
class Skipped:
    """A track left alone because all its takes are current.

    Attributes:
        plan: the track.
        records: the provenance record of each take, in take order.
    """

    plan: TrackPlan
    records: list[dict[str, Any]]


def track_names(names: list[str] | None, all_tracks: bool, prompts_dir: Path) -> list[str]:
    """The names a command runs on: the ones given, or every prompt file with ``--all``."""
    if all_tracks and names:
        raise UsageError("name tracks or pass --all, not both")
    if all_tracks:
        found = available_tracks(prompts_dir)
        if not found:
            raise UsageError(f"--all found no .toml or .txt prompt files in {prompts_dir}/")
        return found
    if not names:
        raise UsageError("name at least one track (e.g. tydust-gen phase4_peak) or pass --all")
    return list(names)


def existing_outputs(plan: TrackPlan) -> list[Path]:
    """Outputs of any take of ``plan`` (MP3, OGG, provenance record) that already exist."""
    paths = [
        p
        for take in plan.takes
        for p in (*export.output_paths(plan.out_dir, take).values(), provenance.record_path(plan.out_dir, take))
    ]
    return [p for p in paths if p.exists()]


def select(plans: list[TrackPlan], *, force: bool, skip_existing: bool, model: dict[str, Any]) -> tuple[list[TrackPlan], list[Skipped]]:
    """Split planned tracks into those to render and those skipped as current.

    Raises:
        UsageError: outputs exist, are not current, and ``force`` is False.
    """
    todo: list[TrackPlan] = []
    skipped: list[Skipped] = []
    for plan in plans:
        existing = existing_outputs(plan)
        if skip_existing and existing:
            records = [provenance.load_if_present(plan.out_dir, take) for take in plan.takes]
            why = None
            for index, record in enumerate(records):
                # A take of a batch records its own seed (see pipeline.render_takes).
                seed = variation_seed(plan.settings.seed, index) if len(plan.takes) > 1 else plan.settings.seed
                why = why or provenance.check_current(
                    record,
                    spec=plan.spec,
                    settings=replace(plan.settings, seed=seed),
                    mastering=plan.mastering,
                    seed_given=not plan.seed_was_random,
                    out_dir=plan.out_dir,
                    model=model,
                )
            if why is None:
                skipped.append(Skipped(plan, records))
                continue
            if not force:
                raise UsageError(f"{existing[0]} exists but is not current ({why}); pass --force to replace it")
        elif existing and not force:
            raise UsageError(f"{existing[0]} already exists; pass --force to replace it")
        todo.append(plan)
    return todo, skipped


def skipped_results(s: Skipped) -> list[TrackResult]:
    """One TrackResult per take of a skipped track, from its records."""
    keys = ("format", "size_bytes", "duration_s", "bitrate_bps", "sample_rate", "channels", "sha256")
    results = []
    for take, rec in zip(s.plan.takes, s.records):
        files = [export.ExportedFile(**{k: f[k] for k in keys}, path=s.plan.out_dir / f["path"]) for f in rec.get("files", [])]
        settings = replace(s.plan.settings, seed=rec.get("settings", {}).get("seed"))
        res = rec.get("result", {})
        results.append(
            TrackResult(name=take, files=files, settings=settings, seed_was_random=bool(rec.get("seed_was_random")),
                        take=res.get("take", 1), takes=res.get("takes", 1))  # fmt: skip
        )
    return results


def check_prompt_lengths(loaded, plans: list[TrackPlan]) -> None:
    """Refuse prompts the text encoder would truncate, before any track generates.

    Raises:
        UsageError: a prompt has more tokens than the tokenizer's model_max_length.
    """
    from .engine import token_count

    for plan in plans:
        n, limit = token_count(loaded, plan.spec.prompt)
        if limit is not None and n > limit:
            raise UsageError(
                f"the prompt of {plan.spec.name!r} is {n} tokens long but the model reads at most {limit}; "
                f"shorten {plan.spec.path} (it would be cut off)"
            )
