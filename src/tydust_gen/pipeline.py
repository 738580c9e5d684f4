"""The straight line from a track name to two verified files.

``plan_track`` does every check that needs no model (prompt file, settings,
output folder, existing outputs) so a batch fails in a second, not after a
minute of generation. ``render_track`` then runs prompt → MusicGen → 44.1 kHz
stereo → MP3 + OGG for one planned track on an already loaded model.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from . import audio, export, faults, generate, provenance
from .engine import LoadedModel
from .errors import UsageError
from .generate import CodeBackend, ProgressCallback
from .prompts import TrackSpec, load_track
from .settings import MAX_SEED, GenerationSettings, resolve_settings

DEFAULT_OUTPUT_ROOT = Path("assets/music")
RANDOM_SEED_BITS = 31  # seeds picked for the user fit in a signed 32-bit int, easy to retype


@dataclass(frozen=True)
class TrackPlan:
    """A track whose inputs all checked out.

    Attributes:
        spec: the parsed prompt file.
        settings: resolved settings (seed always set: picked at random when not given).
        seed_was_random: True when tydust-gen picked the seed.
        out_dir: destination folder.
        outputs: ``{"mp3": path, "ogg": path}``.
    """

    spec: TrackSpec
    settings: GenerationSettings
    seed_was_random: bool
    out_dir: Path
    outputs: dict[str, Path]


@dataclass
class TrackResult:
    """What happened to one track.

    Attributes:
        name: track name.
        files: the verified outputs (empty when the track failed).
        settings: the settings actually used.
        timings: seconds per stage: encode_text+generate ("generate"), "decode", "audio", "export", "total".
        clipped_samples: samples clamped at full scale (0 = no clipping).
        peak: largest absolute sample before clamping (linear).
        steps: decoding steps run.
        windows: generation passes.
        error: the one-line error when the track failed.
    """

    name: str
    files: list[export.ExportedFile] = field(default_factory=list)
    settings: GenerationSettings | None = None
    seed_was_random: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    clipped_samples: int = 0
    peak: float = 0.0
    steps: int = 0
    windows: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def default_out_dir(spec: TrackSpec) -> Path:
    """``assets/music/<folder or genre>/`` when the prompt file names one, else ``assets/music/``."""
    return DEFAULT_OUTPUT_ROOT / spec.folder if spec.folder else DEFAULT_OUTPUT_ROOT


def plan_track(
    name: str,
    *,
    cli_settings: Mapping[str, Any],
    prompts_dir: Path,
    out_dir: Path | None,
    overwrite: bool,
) -> TrackPlan:
    """Check everything about one track that can be checked without the model.

    Raises:
        PromptError, SettingsError: bad prompt file or setting.
        OutputDirError: the destination cannot be written.
        UsageError: outputs exist and ``overwrite`` is False.
    """
    spec = load_track(name, prompts_dir)
    settings = resolve_settings(cli_settings, spec.settings)
    seed_was_random = settings.seed is None
    if seed_was_random:
        settings = replace(settings, seed=secrets.randbelow(2**RANDOM_SEED_BITS))
    assert settings.seed is not None and 0 <= settings.seed <= MAX_SEED
    dest = out_dir if out_dir is not None else default_out_dir(spec)
    export.check_output_dir(dest)
    outputs = export.output_paths(dest, spec.name)
    if not overwrite:
        existing = [p for p in outputs.values() if p.exists()]
        if existing:
            raise UsageError(f"{existing[0]} already exists; pass --force to replace it")
    return TrackPlan(spec, settings, seed_was_random, dest, outputs)


def comment_for(plan: TrackPlan, model_ref: str) -> str:
    """The comment tag: prompt, seed and model, so a file says how it was made."""
    return f"{plan.spec.prompt} | seed={plan.settings.seed} | model={model_ref}"


def render_track(
    loaded: LoadedModel,
    plan: TrackPlan,
    *,
    ffmpeg: export.Ffmpeg,
    backend: CodeBackend | None = None,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
    record_model: dict[str, Any] | None = None,
) -> TrackResult:
    """Generate, process and export one planned track.

    With ``record_model`` (from :func:`provenance.model_identity`) the
    provenance record ``NAME.json`` is staged and committed with the audio.

    Raises:
        TrackError subclasses (GenerationError, ExportError) on failure; the
        destination folder is unchanged then.
    """
    result = TrackResult(name=plan.spec.name, settings=plan.settings, seed_was_random=plan.seed_was_random)
    t0 = time.perf_counter()
    cond = generate.encode_text(loaded, [plan.spec.prompt], plan.settings.sampling.guidance_scale)
    progress = faults.step_hooked(progress)
    codes, windows, steps = generate.generate_codes(loaded, cond, plan.settings, backend=backend, progress=progress)
    t1 = time.perf_counter()
    waves = generate.decode_codes(loaded, codes)
    t2 = time.perf_counter()
    prepared = audio.prepare_for_export(waves[0], plan.settings.duration_s)
    t3 = time.perf_counter()
    result.clipped_samples = prepared.clipped_samples
    result.peak = prepared.peak
    result.steps = steps
    result.windows = len(windows)
    result.timings = {"generate": t1 - t0, "decode": t2 - t1, "audio": t3 - t2}
    sidecar = None
    if record_model is not None:

        def sidecar(files):
            now = time.perf_counter()
            result.timings.update(export=now - t3, total=now - t0)  # export = encode, tag, verify
            return provenance.sidecar_for(plan, result, loaded=loaded, ffmpeg=ffmpeg, model=record_model)(files)

    tags = export.TrackTags(
        title=plan.spec.title, genre=plan.spec.genre, comment=comment_for(plan, loaded.source.ref), bpm=plan.spec.bpm
    )
    try:
        files = export.export_track(prepared.waveform, plan.out_dir, plan.spec.name, tags, ffmpeg=ffmpeg, overwrite=overwrite, sidecar=sidecar)
    except FileExistsError as exc:
        raise UsageError(f"{exc.args[0]} appeared while generating; pass --force to replace it") from None
    t4 = time.perf_counter()
    result.files = files
    result.clipped_samples = prepared.clipped_samples
    result.peak = prepared.peak
    result.steps = steps
    result.windows = len(windows)
    result.timings = {
        "generate": t1 - t0,
        "decode": t2 - t1,
        "audio": t3 - t2,
        "export": t4 - t3,
        "total": t4 - t0,
    }
    return result
