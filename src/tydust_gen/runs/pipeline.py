"""The straight line from a track name to two verified files.

``plan_track`` does every check that needs no model (prompt file, settings,
output folder, existing outputs) so a batch fails in a second, not after a
minute of generation. ``render_track`` then runs prompt → MusicGen → 44.1 kHz
stereo → MP3 + OGG for one planned track on an already loaded model.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from tydust_gen.audio import loop as loop_stage
from tydust_gen.audio import master as master_stage
from tydust_gen.audio import resample as audio
from tydust_gen.base import faults
from tydust_gen.base.errors import MelodyError, SettingsError, TydustError, UsageError
from tydust_gen.base.prompts import TrackSpec, check_sections, load_track
from tydust_gen.base.settings import (
    DEFAULT_CONTEXT_S,
    MAX_SEED,
    parse_context,
    beats_per_bar,
    GenerationSettings,
    MasteringSettings,
    resolve_mastering,
    resolve_settings,
)
from tydust_gen.base.variations import variation_names, variation_seed
from tydust_gen.base.waveform import Waveform
from tydust_gen.export import staging as export
from tydust_gen.export.ffmpeg import Ffmpeg
from tydust_gen.export.loudness import EncodedMasterResult, EncodedPeaks, MeasuredFile, master_for_encoding
from tydust_gen.export.tags import TrackTags, write_loop_tags
from tydust_gen.export.verify import ExportedFile
from tydust_gen.model import generate
from tydust_gen.model.generate import CodeBackend, ProgressCallback
from tydust_gen.model.loading import LoadedModel, ModelSource
from tydust_gen.runs import provenance
from tydust_gen.model.conditioning import SectionConditioning, encode_text

DEFAULT_OUTPUT_ROOT = Path("assets/music")
PREVIEW_SUFFIX = ".png"
RANDOM_SEED_BITS = 31  # seeds picked for the user fit in a signed 32-bit int, easy to retype
_HF_CACHE_REPO_PREFIX = "models--"  # huggingface_hub cache folder of a model repo: models--ORG--NAME
_TAG_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # ORG/NAME, nothing path-like
# Rate a melody is decoded at when it is checked before the model loads: the chroma extractor's rate in every
# melody checkpoint (at render time the loaded extractor's own rate is used).
MELODY_CHECK_RATE = 32_000  # Hz


@dataclass(frozen=True)
class Continuation:
    """The audio a track continues: its tail becomes the first window's prefix.

    Attributes:
        path: the audio file (any format ffmpeg reads).
        context_s: seconds of its end fed to the model (at most ``MAX_CONTEXT_S``).
        track: the track it belongs to when the prompt file named one (``continue_from``), else None.
    """

    path: Path
    context_s: float = DEFAULT_CONTEXT_S
    track: str | None = None


@dataclass(frozen=True)
class MelodySource:
    """The audio whose tune a track follows (melody models, :mod:`tydust_gen.model.melody`).

    Attributes:
        path: the file (any format ffmpeg reads); ``--melody`` as given, or the prompt
            file's ``melody`` relative to the prompt file's folder.
    """

    path: Path


@dataclass(frozen=True)
class TrackPlan:
    """A track whose inputs all checked out.

    Attributes:
        spec: the parsed prompt file.
        settings: resolved settings (seed always set: picked at random when not given).
        seed_was_random: True when tydust-gen picked the seed.
        out_dir: destination folder.
        outputs: ``{"mp3": path, "ogg": path}`` of the first take.
        mastering: loudness, fades, loop, variations, preview.
        takes: output base names, one per variation (``[name]`` for one take).
        continuation: the audio this track continues, or None.
        melody: the audio whose tune the track follows, or None.
    """

    spec: TrackSpec
    settings: GenerationSettings
    seed_was_random: bool
    out_dir: Path
    outputs: dict[str, Path]
    mastering: MasteringSettings = field(default_factory=MasteringSettings)
    takes: tuple[str, ...] = ()
    continuation: Continuation | None = None
    melody: MelodySource | None = None


@dataclass
class TrackResult:
    """What happened to one track.

    Attributes:
        name: track name.
        files: the verified outputs (empty when the track failed).
        settings: the settings actually used.
        timings: seconds per stage: "generate" (text encoding + tokens, whole batch), "decode" (EnCodec,
            whole batch), "audio" (resample, DC, loop/fades), "master_export" (mastering passes, encoding,
            tagging, verification), "total".
        steps: decoding steps run.
        windows: generation passes.
        error: the one-line error when the track failed.
        take: 1-based index of this take among ``takes`` variations.
        takes: how many takes were generated together in one batch.
        batch_seed: the track's seed when this take came from a batch of
            variations; ``settings.seed`` is then the take's own seed (take 1:
            the batch seed), which reproduces it alone.
        loudness: measured loudness/peak figures (LUFS, dBTP) before and after mastering,
            and the true peak of each decoded output file.
        loop: loop points (samples at 44.1 kHz) and seam figures, in loop mode.
        preview: the PNG written beside the audio, if asked for.
        sections: for a track in sections, each one's start, prompt, guidance and the
            generation windows that were conditioned on it (0-based); None otherwise.
        decode_path: which decode path ran and the self-check's measured error
            (:attr:`tydust_gen.model.selfcheck.CheckedBackend.report`), or None for an unchecked backend.
        model_family: ``mono`` / ``stereo`` / ``melody`` (:attr:`LoadedModel.family`): which MusicGen made it.
        continuation: the continued audio: ``{"path", "track", "sha256", "context_s", "prompt_frames"}``, or None.
        melody: the followed melody: ``{"path", "sha256", "duration_s", "windows"}`` (each window's stretch,
            :meth:`tydust_gen.model.melody.MelodySlice.facts`), or None.
    """

    name: str
    files: list[ExportedFile] = field(default_factory=list)
    settings: GenerationSettings | None = None
    seed_was_random: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    windows: int = 0
    error: str | None = None
    take: int = 1
    takes: int = 1
    batch_seed: int | None = None
    loudness: dict[str, Any] | None = None
    loop: dict[str, Any] | None = None
    preview: Path | None = None
    sections: list[dict[str, Any]] | None = None
    decode_path: dict[str, Any] | None = None
    model_family: str | None = None
    continuation: dict[str, Any] | None = None
    melody: dict[str, Any] | None = None

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
    mastering = resolve_mastering(cli_settings, spec.settings, settings.duration_s)
    check_sections(spec, settings.duration_s)
    seed_was_random = settings.seed is None
    if seed_was_random:
        settings = replace(settings, seed=secrets.randbelow(2**RANDOM_SEED_BITS))
    assert settings.seed is not None and 0 <= settings.seed <= MAX_SEED
    dest = out_dir if out_dir is not None else default_out_dir(spec)
    export.check_output_dir(dest)
    takes = tuple(variation_names(spec.name, mastering.variations))
    if len(takes) > 1 and settings.backend == "stock":
        raise SettingsError(
            "--variations needs --backend fast or fast-int8: transformers' generate draws all takes from one "
            "random stream, so a take could not be reproduced from its own seed"
        )
    outputs = export.output_paths(dest, takes[0])
    continuation = plan_continuation(spec, cli_settings, dest)
    melody = plan_melody(spec, cli_settings)
    if melody is not None and len(takes) > 1:
        raise SettingsError(
            "--variations cannot be combined with a melody: melody models run on the stock backend, which draws all "
            "takes from one random stream; render takes one at a time with different --seed values"
        )
    if not overwrite:
        for take in takes:
            # the record too: TRACK.json alone (audio deleted by hand) is still an earlier take's history
            candidates = [*export.output_paths(dest, take).values(), provenance.record_path(dest, take)]
            if mastering.preview:
                candidates.append(dest / f"{take}{PREVIEW_SUFFIX}")
            existing = [p for p in candidates if p.exists()]
            if existing:
                raise UsageError(f"{existing[0]} already exists; pass --force to replace it")
    return TrackPlan(spec, settings, seed_was_random, dest, outputs, mastering, takes, continuation, melody)


def plan_melody(spec: TrackSpec, cli_settings: Mapping[str, Any]) -> MelodySource | None:
    """The melody ``spec`` follows: ``--melody FILE`` beats the prompt file's ``melody = "FILE"``.

    A relative path in the prompt file is taken from the prompt file's folder (a prompts
    folder moves with its themes); ``--melody`` from the working directory, as any
    command-line path. The file is decoded and checked here, before the model loads
    (:func:`read_melody`).

    Raises:
        MelodyError: the file is missing, unreadable, silent or too long.
    """
    given = cli_settings.get("melody")
    if given is not None:
        path, origin = Path(given).expanduser(), f"--melody {given}"
    else:
        raw = spec.settings.get("melody")
        if raw is None:
            return None
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = spec.path.parent / path
        origin = f"{spec.path}: melody = {raw!r}"
    if not path.is_file():
        raise MelodyError(f"{origin}: no such file ({path}); pass the audio file whose tune the track should follow")
    read_melody(path, MELODY_CHECK_RATE)
    return MelodySource(path=path)


def read_melody(path: Path, sample_rate: int) -> np.ndarray:
    """Decode a melody file to mono float32 ``[N]`` at ``sample_rate`` with ffmpeg, and check it can steer a track.

    Raises:
        MelodyError: ffmpeg cannot read it, it holds no audio, is silent, or is longer than
            :data:`~tydust_gen.model.melody.MAX_MELODY_S` (decoding stops just past that).
    """
    from tydust_gen.export.loudness import decode_audio
    from tydust_gen.model.melody import MAX_MELODY_S, check_melody

    if not path.is_file():
        raise MelodyError(f"melody {path} does not exist; pass the audio file whose tune the track should follow")
    try:
        # one second past the limit is enough to tell "too long" without decoding hours
        samples = decode_audio(path, sample_rate=sample_rate, channels=1, max_seconds=MAX_MELODY_S + 1)[0]
    except TydustError as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise MelodyError(f"melody {path}: ffmpeg cannot read it as audio ({detail}); pass an audio file") from None
    check_melody(samples, sample_rate, str(path))
    return samples


def melody_input(loaded: LoadedModel, melody: MelodySource) -> tuple[np.ndarray, dict[str, Any]]:
    """The melody's samples at the chroma extractor's rate, and the facts the record keeps about the file.

    Raises:
        MelodyError: the model has no melody input, or the file cannot be used (:func:`read_melody`).
    """
    from tydust_gen.export.verify import sha256_file
    from tydust_gen.model.melody import check_melody_model

    check_melody_model(loaded, True)
    rate = int(loaded.processor.feature_extractor.sampling_rate)
    samples = read_melody(melody.path, rate)
    facts = {
        "path": str(melody.path.resolve()),
        "sha256": sha256_file(melody.path),
        "duration_s": round(samples.shape[-1] / rate, 4),
    }
    return samples, facts


def melody_windows(loaded: LoadedModel, windows, melody_samples: int) -> list[dict[str, Any]]:
    """Each generation window's stretch of the melody, as the record gives it."""
    from tydust_gen.model.melody import window_slices

    rate = int(loaded.processor.feature_extractor.sampling_rate)
    return [s.facts(rate, melody_samples) for s in window_slices(windows, loaded.frame_rate, rate)]


def continuation_output(out_dir: Path, track: str) -> Path:
    """The finished output of ``track`` that a ``continue_from`` names: its OGG (no encoder delay at the start)."""
    return export.output_paths(out_dir, track)["ogg"]


def plan_continuation(spec: TrackSpec, cli_settings: Mapping[str, Any], dest: Path) -> Continuation | None:
    """The audio ``spec`` continues: ``--continue-from FILE`` beats the prompt file's ``continue_from = "TRACK"``.

    A named track's output is looked for in ``dest``; it need not exist yet when the
    same batch renders that track first (:func:`tydust_gen.runs.batch.order_continuations`).

    Raises:
        SettingsError: a bad ``--context``, a missing ``--continue-from`` file, or a track continuing itself.
    """
    raw_context = cli_settings.get("context")
    context = parse_context(raw_context) if raw_context is not None else spec.settings.get("context", DEFAULT_CONTEXT_S)
    given = cli_settings.get("continue_from")
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise SettingsError(f"--continue-from {given}: no such file; pass the audio to continue")
        return Continuation(path=path, context_s=context)
    track = spec.settings.get("continue_from")
    if track is None:
        return None
    if track == spec.name:
        raise SettingsError(f"{spec.path}: continue_from names the track itself; name the track it follows")
    return Continuation(path=continuation_output(dest, track), context_s=context, track=track)


def continuation_prompt(loaded: LoadedModel, cont: Continuation):
    """The tail of ``cont``'s audio as prompt codes ``[1, K, P]``, and the facts the record keeps.

    The file is decoded by ffmpeg at the model's rate and channel count (a mono file
    feeds both sides of a stereo model, a stereo file is mixed down for a mono one);
    the last ``context_s`` seconds, a whole number of codec frames, are EnCodec-encoded.

    Raises:
        UsageError: the file is missing or ffmpeg cannot decode it.
    """
    import torch

    from tydust_gen.export.loudness import decode_audio
    from tydust_gen.export.verify import sha256_file
    from tydust_gen.model.continuation import encode_prompt, prompt_frames

    if not cont.path.is_file():
        what = f"the output of {cont.track!r}" if cont.track else "the audio to continue"
        raise UsageError(f"{cont.path} ({what}) does not exist; render {cont.track or 'it'} first")
    try:
        samples = decode_audio(cont.path, sample_rate=loaded.sample_rate, channels=loaded.audio_channels)
    except TydustError as exc:
        raise UsageError(f"{cont.path}: ffmpeg cannot read it as audio; pass an audio file ({exc})") from None
    frames = prompt_frames(loaded, cont.context_s, samples.shape[-1])
    hop = loaded.sample_rate // loaded.frame_rate
    tail = torch.from_numpy(np.array(samples[:, samples.shape[-1] - frames * hop :], dtype=np.float32))
    codes = encode_prompt(loaded, tail)
    facts = {
        "path": str(cont.path.resolve()),
        "track": cont.track,
        "sha256": sha256_file(cont.path),
        "context_s": cont.context_s,
        "prompt_frames": frames,
    }
    return codes, facts


def model_tag_id(source: ModelSource) -> str:
    """The model's name as the tags give it: a hub id, never a local path.

    Tags ship inside a game's audio, so a ``--model`` folder must not put the
    user's directories there (the provenance record keeps the path). A hub id
    is used as given; a Hugging Face cache snapshot
    (``.../models--ORG--NAME/snapshots/COMMIT``) gives ``ORG/NAME``; another
    folder gives its config's ``_name_or_path`` when that is a hub id
    (``ORG/NAME``, as older transformers saved it), else the folder's own name.
    """
    if source.hub_id is not None or source.local_dir is None:
        return source.hub_id or source.ref
    folder = source.local_dir
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(_HF_CACHE_REPO_PREFIX):
        return folder.parent.parent.name[len(_HF_CACHE_REPO_PREFIX) :].replace("--", "/")
    try:
        saved = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        saved = None
    if isinstance(saved, str) and _TAG_HUB_ID.fullmatch(saved):
        return saved
    return folder.name


def comment_for(plan: TrackPlan, model_id: str, take: int = 1, family: str | None = None) -> str:
    """The comment tag: prompt, seed and model id (:func:`model_tag_id`) (and take of a batch), so a file says how it was made.

    ``family`` (``mono``/``stereo``/``melody``) follows the model id when given.
    """
    model = model_id if family is None else f"{model_id} ({family})"
    if len(plan.takes) > 1:
        seed = variation_seed(plan.settings.seed, take - 1)
        return f"{plan.spec.described} | seed={seed} (take {take}/{len(plan.takes)} of batch seed {plan.settings.seed}) | model={model}"
    return f"{plan.spec.described} | seed={plan.settings.seed} | model={model}"


def section_conditioning(loaded: LoadedModel, plan: TrackPlan) -> list[SectionConditioning]:
    """One text conditioning per section of the track (all takes share it); empty for a one-prompt track."""
    out = []
    for section in plan.spec.sections:
        guidance = plan.settings.sampling.guidance_scale if section.guidance_scale is None else section.guidance_scale
        cond = encode_text(loaded, [section.prompt] * len(plan.takes), guidance)
        out.append(SectionConditioning(section.at, cond, replace(plan.settings.sampling, guidance_scale=guidance)))
    return out


def section_windows(plan: TrackPlan, windows) -> list[dict[str, Any]] | None:
    """Each section of the track with the windows (0-based) that were conditioned on it."""
    if not plan.spec.sections:
        return None
    return [
        {"at_s": sec.at, "prompt": sec.prompt, "guidance_scale": sec.guidance_scale,
         "windows": [n for n, w in enumerate(windows) if w.section == i]}
        for i, sec in enumerate(plan.spec.sections)
    ]  # fmt: skip


def render_track(
    loaded: LoadedModel,
    plan: TrackPlan,
    *,
    ffmpeg: Ffmpeg,
    backend: CodeBackend,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
    record_model: dict[str, Any] | None = None,
) -> TrackResult:
    """Generate, master and export a planned single-take track (see :func:`render_takes`)."""
    return render_takes(
        loaded, plan, ffmpeg=ffmpeg, backend=backend, progress=progress, overwrite=overwrite, record_model=record_model
    )[0]


AFTER_MODEL_MODULES = ("scipy.signal", "scipy.ndimage", "torchaudio.transforms")


def import_in_background(modules: Sequence[str]) -> threading.Thread:
    """Import ``modules`` in a daemon thread, so a stage that needs them later finds them loaded.

    The stages after the model import scipy's signal and image modules on first use: 1.6-2.2 s here,
    which every command spent in its "audio" stage after generation (a 90 s tiny-model run: audio
    2.3 s, of it 2.1 s importing scipy.signal). Started once the main thread's own imports are done
    (the model loaded, the prompt encoded), right before generation, whose torch work leaves the
    interpreter free; nothing in the main thread imports these packages meanwhile, so the two never
    wait on each other's module locks. A failure is left for the stage itself to meet and report.
    """
    import importlib

    def load() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the stage that needs it imports it again and says what failed
                continue

    thread = threading.Thread(target=load, name="tydust-imports", daemon=True)
    thread.start()
    return thread


def render_takes(
    loaded: LoadedModel,
    plan: TrackPlan,
    *,
    ffmpeg: Ffmpeg,
    backend: CodeBackend,
    progress: ProgressCallback | None = None,
    stage: Callable[[str], None] | None = None,
    overwrite: bool = False,
    record_model: dict[str, Any] | None = None,
) -> list[TrackResult]:
    """Generate all takes of a planned track in one batch, then master and export each.

    Stages: text encoding and windowed generation (all takes at once) →
    EnCodec decode → 44.1 kHz stereo → DC removal → loop folding (on the bar
    when the beat is clear, :func:`tydust_gen.audio.loop.loop_take`) or fades →
    loudness/true-peak mastering checked on the encoded files → verified MP3 +
    OGG (+ loop tags, + preview) moved into place.

    ``stage(name)`` is called as each stage starts ("generating", "decoding",
    "mastering", "encoding") so a front end can say what is happening.

    With ``record_model`` (from :func:`provenance.model_identity`) each take's
    provenance record ``TAKE.json`` is staged and committed with its audio.

    Raises:
        TrackError subclasses (GenerationError, ExportError) on failure; files of
        takes already exported stay, the failing take leaves nothing behind.
    """
    m = plan.mastering
    announce = stage or (lambda name: None)
    announce("generating")
    gen_duration = plan.settings.duration_s
    if m.loop:  # room for a loop on the bar before the tempo is known (loop_stage.loop_source_length_s)
        gen_duration = loop_stage.loop_source_length_s(
            plan.settings.duration_s, bars=m.bars, beats_per_bar=beats_per_bar(m.meter), bpm_prior=plan.spec.bpm
        )
    gen_settings = replace(plan.settings, duration_s=gen_duration)
    t0 = time.perf_counter()
    prompts = [plan.spec.prompt] * len(plan.takes)
    sections = section_conditioning(loaded, plan)
    cond = sections[0].cond if sections else encode_text(loaded, prompts, plan.settings.sampling.guidance_scale)
    progress = faults.step_hooked(progress)
    take_seeds = (
        [variation_seed(plan.settings.seed, i) for i in range(len(plan.takes))] if len(plan.takes) > 1 else None
    )
    prompt_codes, continued = (None, None) if plan.continuation is None else continuation_prompt(loaded, plan.continuation)
    melody, followed = (None, None) if plan.melody is None else melody_input(loaded, plan.melody)
    import_in_background(AFTER_MODEL_MODULES)  # while the model generates
    codes, windows, steps = generate.generate_codes(
        loaded, cond, gen_settings, backend=backend, progress=progress, take_seeds=take_seeds, sections=sections,
        prompt_codes=prompt_codes, melody=melody,
    )  # fmt: skip
    if followed is not None:
        followed["windows"] = melody_windows(loaded, windows, melody.shape[-1])
    t1 = time.perf_counter()
    announce("decoding")
    faults.hook("decode")
    waves = generate.decode_codes(loaded, codes, lead_in=prompt_codes)
    t2 = time.perf_counter()
    # Generation and decoding run once for the whole batch of takes; each take reports the batch time.
    per_take_shared = {"generate": t1 - t0, "decode": t2 - t1}

    results = []
    for index, (take, wave) in enumerate(zip(plan.takes, waves), start=1):
        ta = time.perf_counter()
        announce("mastering" if len(plan.takes) == 1 else f"mastering take {index}")
        faults.hook("master")
        prepared = prepare_take_audio(
            wave, generated_s=gen_duration, duration_s=plan.settings.duration_s, mastering=m, bpm_prior=plan.spec.bpm
        )
        sr, dc_offset, loop_info = prepared.sample_rate, prepared.dc_offset, prepared.loop
        tb = time.perf_counter()
        announce("encoding" if len(plan.takes) == 1 else f"encoding take {index}")
        tags = TrackTags(
            title=plan.spec.title if len(plan.takes) == 1 else f"{plan.spec.title} (take {index})",
            genre=plan.spec.genre,
            comment=comment_for(plan, model_tag_id(loaded.source), take=index, family=loaded.family),
            bpm=plan.spec.bpm if plan.spec.bpm is not None else (loop_info or {}).get("bpm"),
        )
        batch = len(plan.takes) > 1
        result = TrackResult(
            name=take,
            settings=replace(plan.settings, seed=variation_seed(plan.settings.seed, index - 1)) if batch else plan.settings,
            batch_seed=plan.settings.seed if batch else None,
            seed_was_random=plan.seed_was_random,
            steps=steps,
            windows=len(windows),
            take=index,
            takes=len(plan.takes),
            sections=section_windows(plan, windows),
            decode_path=getattr(backend, "report", None),
            model_family=loaded.family,
            continuation=continued,
            melody=followed,
        )
        try:
            with export.Staging(plan.out_dir, take, ffmpeg=ffmpeg) as staging:

                def encode(mastering_pass) -> list[MeasuredFile]:
                    # each file is measured in its encoding thread: the MP3 once written, while the OGG encodes
                    peaks = EncodedPeaks(circular=m.loop)  # the OGG is measured while it is encoded
                    wave = Waveform(_tensor(mastering_pass.samples), sr)
                    return staging.encode(wave, tags, then=peaks.measure, watch=peaks.watch)

                mastered = master_take(prepared, m, encode)
                if m.loop:
                    write_loop_tags(staging.staged("ogg"), loop_info["loop_start"], loop_info["loop_length"])
                    seam = loop_stage.seam_metric(mastered.master.samples, sr, **prepared.seam_options)
                    loop_info.update({f"seam_{k}": _num(v) for k, v in seam.__dict__.items()})
                if m.preview:
                    from tydust_gen.audio.preview import render_preview

                    staged_png = staging.add_extra(f"{take}{PREVIEW_SUFFIX}")
                    marks = [(sec.at, f"§{i}") for i, sec in enumerate(plan.spec.sections) if i]
                    render_preview(mastered.master.samples, sr, staged_png, title=f"{take}",
                                   loop_seam=loop_info["loop_length"] if loop_info else None, sections=marks)  # fmt: skip
                    result.preview = plan.out_dir / staged_png.name
                result.loop = loop_info
                result.loudness = _loudness_figures(m, mastered, dc_offset)

                def finish_timings() -> None:
                    result.timings = {**per_take_shared, "audio": tb - ta, "master_export": time.perf_counter() - tb}
                    result.timings["total"] = sum(result.timings.values())

                sidecar = None
                if record_model is not None:

                    def sidecar(files):
                        finish_timings()
                        return provenance.sidecar_for(plan, result, loaded=loaded, ffmpeg=ffmpeg, model=record_model)(files)

                # a loop on the bar is a whole number of bars long, not --duration
                result.files = staging.publish(prepared.samples.shape[1] / sr, overwrite=overwrite, sidecar=sidecar)
                finish_timings()
        except FileExistsError as exc:
            raise UsageError(f"{exc.args[0]} appeared while generating; pass --force to replace it") from None
        results.append(result)
    announce("done")
    return results


@dataclass(frozen=True)
class TakeAudio:
    """One take between the model and the mastering stage.

    Attributes:
        samples: float32 ``[2, N]`` at ``sample_rate``: DC removed, resampled, then looped or faded.
        sample_rate: Hz (44.1 kHz).
        dc_offset: each channel's mean before DC removal (JSON numbers).
        loop: loop points, beat grid and the seam figures of a hard cut, in loop mode; else None.
        seam_options: keyword arguments for :func:`tydust_gen.audio.loop.seam_metric` of this loop (beat period, meter).
    """

    samples: np.ndarray
    sample_rate: int
    dc_offset: list[Any]
    loop: dict[str, Any] | None
    seam_options: dict[str, Any] = field(default_factory=dict)


def prepare_take_audio(
    wave: Waveform, *, generated_s: float, duration_s: float, mastering: MasteringSettings, bpm_prior: float | None = None
) -> TakeAudio:
    """The model's output (32 kHz) → DC removal → 44.1 kHz stereo → loop on the bar, or fades.

    Args:
        wave: one take as decoded by EnCodec, ``[C, N]`` at the model's rate (C = 2: the
            model's own left/right, kept; C = 1: copied to both sides).
        generated_s: seconds generated (the track plus the loop overrun in loop mode).
        duration_s: the track's length, seconds (the loop length in loop mode).
        mastering: fades, loop mode, bars and meter.
        bpm_prior: the prompt file's ``bpm``, the centre of the loop's tempo search.
    """
    m = mastering
    raw = wave.samples.detach().cpu().numpy()
    dc_offset = [_num(v) for v in np.broadcast_to(raw.mean(axis=1), (audio.TARGET_CHANNELS,))]  # mono: both sides
    # DC goes first, once, before loop folding and fades (fading an offset makes a thump), and at the
    # model's rate: a linear filter commutes with resampling and copying to both sides, and the model's
    # 32 kHz channels are under half the samples of 44.1 kHz stereo (mono), so it costs less than after.
    # master_take tells the mastering stage not to run the high-pass a second time.
    clean = Waveform(_tensor(master_stage.remove_dc(raw, wave.sample_rate)), wave.sample_rate)
    stereo = audio.to_44k1_stereo(clean, generated_s)
    sr = stereo.sample_rate
    x = stereo.samples.numpy()
    if m.loop:
        # Beat grid, then a loop of whole bars cut on the downbeat; no clear beat: a loop of the duration.
        looped = loop_stage.loop_take(x, sr, duration_s=duration_s, bars=m.bars, meter=m.meter, bpm_prior=bpm_prior)
        return TakeAudio(looped.loop.samples, sr, dc_offset, looped.info, looped.seam_options)
    if m.fade_in_s or m.fade_out_s:
        x = master_stage.apply_fades(x, sr, fade_in_s=m.fade_in_s, fade_out_s=m.fade_out_s)
    return TakeAudio(x, sr, dc_offset, None)


def master_take(
    take: TakeAudio,
    mastering: MasteringSettings,
    encode: Callable[[master_stage.MasterResult], Sequence[str | os.PathLike[str] | MeasuredFile]],
) -> EncodedMasterResult:
    """Master a prepared take to the loudness target and the ceiling, checked on the files ``encode`` writes."""
    m = mastering
    return master_for_encoding(
        take.samples, take.sample_rate, encode, target_lufs=m.loudness_lufs, ceiling_dbtp=m.true_peak_dbtp,
        circular=m.loop, highpass_hz=None,  # prepare_take_audio removed DC already
    )  # fmt: skip


def _loudness_figures(m: MasteringSettings, mastered, dc_offset: list[Any]) -> dict[str, Any]:
    """What the mastering stage measured, for the summary and the provenance record."""
    mr = mastered.master
    return {
        "target_lufs": m.loudness_lufs,
        "ceiling_dbtp": m.true_peak_dbtp,
        "input_lufs": _num(mr.input_lufs),
        "input_true_peak_dbtp": _num(mr.input_true_peak_dbtp),
        "dc_offset": dc_offset,
        "gain_db": _num(mr.gain_db),
        "limiter_max_reduction_db": _num(mr.limiter_max_reduction_db),
        "output_lufs": _num(mr.output_lufs),
        "output_true_peak_dbtp": _num(mr.output_true_peak_dbtp),
        "encoded_true_peak_dbtp": {Path(p).suffix.lstrip("."): _num(v) for p, v in zip(mastered.paths, mastered.encoded_true_peaks_dbtp)},
        "encode_tries": mastered.tries,
        "target_reached": mr.target_reached,
        "ceiling_met": mastered.ceiling_met,
    }


def _tensor(samples: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))


def _num(value: Any) -> Any:
    """Floats for JSON: round, and map the infinities of silence to None."""
    if isinstance(value, (bool, int)) or value is None:
        return value
    value = float(value)
    return round(value, 4) if np.isfinite(value) else None
