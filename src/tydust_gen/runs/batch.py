"""A batch of tracks: which run, which are skipped, and :func:`run_batch`, which renders them on one loaded model.

Policy (never lose a take): outputs that exist are refused unless ``--force``.
With ``--skip-existing`` a track whose take is complete and current — its
``NAME.json`` matches the prompt file hash, every setting (the seed only when
one was given) and the model, and both files still have their recorded size and
sha256 — is skipped; one that exists but is not current is still refused
without ``--force``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

from tydust_gen.base.errors import DeviceError, MelodyError, SettingsError, TydustError, UsageError
from tydust_gen.base.prompts import available_tracks
from tydust_gen.base.variations import variation_seed
from tydust_gen.export import staging as export
from tydust_gen.export.ffmpeg import Ffmpeg, check_encoders, find_ffmpeg
from tydust_gen.export.verify import ExportedFile
from tydust_gen.model.generate import CodeBackend, ProgressCallback
from tydust_gen.model.loading import LoadedModel
from tydust_gen.runs import provenance
from tydust_gen.runs.pipeline import TrackPlan, TrackResult, plan_track, render_takes


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
    for plan in plans:  # in render order: a continued track of the batch comes before its continuation
        existing = existing_outputs(plan)
        if skip_existing and existing:
            records = [provenance.load_if_present(plan.out_dir, take) for take in plan.takes]
            cont = plan.continuation
            # the track it continues is rendered again in this run: its audio, and so this take, will change
            why = "the track it continues is rendered again" if cont and cont.track in {p.spec.name for p in todo} else None
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
                    melody=plan.melody.path if plan.melody is not None else None,
                    continuation=cont.path if cont is not None else None,
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
        files = [ExportedFile(**{k: f[k] for k in keys}, path=s.plan.out_dir / f["path"]) for f in rec.get("files", [])]
        settings = replace(s.plan.settings, seed=rec.get("settings", {}).get("seed"))
        res = rec.get("result", {})
        results.append(
            TrackResult(name=take, files=files, settings=settings, seed_was_random=bool(rec.get("seed_was_random")),
                        take=res.get("take", 1), takes=res.get("takes", 1))  # fmt: skip
        )
    return results


def fit_model_family(plans: list[TrackPlan], family: str | None, *, model_ref: str, cli_settings: Mapping[str, Any]) -> list[TrackPlan]:
    """The plans as a model of ``family`` runs them: melody models on the stock backend.

    A melody model feeds its conditioning ahead of the audio tokens, which only
    transformers' generate (``stock``) runs here; a track that did not ask for a backend
    gets ``stock``, one that asked for ``fast``/``fast-int8`` is refused. ``family`` None
    (the config could not be read before loading) changes nothing; the caller asks again
    with the loaded model's family.

    Raises:
        MelodyError: a melody for a model without melody input.
        SettingsError: a melody model with ``--backend fast``/``fast-int8``, or with ``--variations``.
    """
    from tydust_gen.model.melody import MELODY_BACKEND, melody_unsupported_message

    if family is None:
        return plans
    out = []
    for plan in plans:
        if plan.melody is not None and family != "melody":
            raise MelodyError(melody_unsupported_message(model_ref))
        if family == "melody" and plan.settings.backend != MELODY_BACKEND:
            if cli_settings.get("backend") is not None or "backend" in plan.spec.settings:
                raise SettingsError(
                    f"the {plan.settings.backend} backend does not run melody models ({model_ref}); "
                    "use --backend stock (the default for melody models)"
                )
            if len(plan.takes) > 1:
                raise SettingsError(
                    f"{plan.spec.name}: --variations needs the fast backend, which does not run melody models "
                    f"({model_ref}); render takes one at a time with different --seed values"
                )
            plan = replace(plan, settings=replace(plan.settings, backend=MELODY_BACKEND))
        out.append(plan)
    return out


def check_prompt_lengths(loaded, plans: list[TrackPlan]) -> None:
    """Refuse prompts the text encoder would truncate, before any track generates.

    Raises:
        UsageError: a prompt has more tokens than the tokenizer's model_max_length.
    """
    from tydust_gen.model.conditioning import token_count

    for plan in plans:
        texts = [(f"the section at {s.at:g} s of {plan.spec.name!r}", s.prompt) for s in plan.spec.sections]
        for what, text in texts or [(f"the prompt of {plan.spec.name!r}", plan.spec.prompt)]:
            n, limit = token_count(loaded, text)
            if limit is not None and n > limit:
                raise UsageError(
                    f"{what} is {n} tokens long but the model reads at most {limit}; "
                    f"shorten {plan.spec.path} (it would be cut off)"
                )


# --------------------------------------------------------------------------- running a batch

#: stage(name) — what a track is doing now ("generating", "decoding", "mastering", "encoding", "done").
StageCallback = Callable[[str], None]


class WorkerBoard:
    """Progress of a batch spread over workers (:mod:`tydust_gen.runs.distributed`); does nothing here."""

    def worker(self, label: str, text: str, done: int | None = None, total: int | None = None) -> None:
        """Worker ``label`` is doing ``text`` (e.g. "game_over: generating"), ``done`` of ``total`` steps."""

    def batch(self, finished: int, total: int) -> None:
        """``finished`` of ``total`` tracks are done (written or failed)."""


class RunListener:
    """What a front end hears from a run. Every method does nothing here; the CLI overrides them.

    The core never prints: lines for the person at the terminal arrive through
    :meth:`info` and :meth:`warn`, a failed track through :meth:`track_failed`
    (the batch goes on), and per-track progress through the callbacks that
    :meth:`track` yields while the track renders.

    Attributes:
        interactive: a person watches a terminal (the hub's download bars may then be shown).
    """

    interactive: bool = False

    def info(self, text: str) -> None:
        """An informational line (loading the model, building the kernel)."""

    def warn(self, text: str) -> None:
        """Something the user should know that does not stop the run."""

    def track_failed(self, name: str, message: str) -> None:
        """Track ``name`` failed with this one-line message; the batch goes on."""

    @contextlib.contextmanager
    def track(self, name: str) -> Iterator[tuple[ProgressCallback | None, StageCallback | None]]:
        """Wraps one track's rendering; yields ``(progress, stage)`` callbacks, or Nones."""
        yield None, None

    @contextlib.contextmanager
    def workers(self, labels: list[str], tracks: int) -> Iterator[WorkerBoard]:
        """Wraps a batch rendered by several workers at once; yields where their progress goes."""
        yield WorkerBoard()


class ScaleOut(Protocol):
    """Renders planned tracks outside this process (see :mod:`tydust_gen.runs.distributed`).

    ``render`` runs with every track's lock held; it writes each finished take
    into its ``out_dir`` itself and returns ``(results, device, load_s)``: one
    :class:`TrackResult` per take (a failed track: one failed result), the
    device(s) as text, and the seconds the workers spent loading the model.
    """

    def render(
        self,
        plans: list[TrackPlan],
        *,
        source: Any,
        identity: dict[str, Any],
        ffmpeg: Ffmpeg,
        force: bool,
        listener: RunListener,
    ) -> tuple[list[TrackResult], str, float]: ...


@dataclass(frozen=True)
class BatchRequest:
    """One ``generate`` command, as the CLI parsed it.

    Attributes:
        tracks: track names, or None with ``all_tracks``.
        cli_settings: option values as typed (strings, None when not given); parsed by
            :mod:`tydust_gen.base.settings`, so a bad value is refused with the flag's name.
        model_ref: hub id or local folder.
        device_name: "auto", "cpu", "cuda" or "cuda:N".
        dtype_name: the decoder's compute dtype, "auto", "fp16", "bf16" or "fp32" (model/loading.py).
        prompts_dir: folder of prompt files.
        out_dir: output folder, or None for the prompt file's default.
        force: replace existing outputs.
        all_tracks: every prompt file in ``prompts_dir``.
        skip_existing: leave current takes alone.
    """

    tracks: list[str] | None
    cli_settings: Mapping[str, Any]
    model_ref: str
    device_name: str = "auto"
    dtype_name: str = "auto"
    prompts_dir: Path = Path("prompts")
    out_dir: Path | None = None
    force: bool = False
    all_tracks: bool = False
    skip_existing: bool = False


@dataclass
class BatchResult:
    """What a batch did.

    Attributes:
        results: one :class:`TrackResult` per take, in the order the tracks were named.
        statuses: ``{take name: "ok" | "skipped" | "failed"}``.
        device: the device the model ran on (as text).
        dtype: the decoder's compute dtype ("fp16", "bf16", "fp32"; None when no model loaded here).
        load_s: seconds spent loading the model (0 when every track was skipped).
        total_s: seconds for the whole batch.
    """

    results: list[TrackResult]
    statuses: dict[str, str]
    device: str
    load_s: float
    total_s: float
    dtype: str | None = None

    @property
    def failed(self) -> list[TrackResult]:
        return [r for r in self.results if not r.ok]


def plan_tracks(request: BatchRequest) -> list[TrackPlan]:
    """Every check that needs no model, for every track, in about a second.

    Raises:
        UsageError: no tracks, a track listed twice, outputs in the way, bad settings or prompt files.
    """
    names = track_names(request.tracks, request.all_tracks, request.prompts_dir)
    plans = []
    writers: dict[str, str] = {}  # output MP3 of every take -> the track that writes it
    for name in names:
        plan = plan_track(
            name,
            cli_settings=request.cli_settings,
            prompts_dir=request.prompts_dir,
            out_dir=request.out_dir,
            overwrite=request.force or request.skip_existing,
        )
        if any(p.spec.name == name for p in plans):
            raise UsageError(f"track {name!r} is listed twice; name each track once")
        for take in plan.takes:
            path = export.output_paths(plan.out_dir, take)["mp3"]
            other = writers.setdefault(str(path.resolve()), name)
            if other != name:
                # e.g. boss with variations = 2 writes boss_v1, as does a track called boss_v1:
                # with --force the second would replace the first's take in the same run
                raise UsageError(
                    f"tracks {other!r} and {name!r} would both write {path}; rename one of them or give them different folders"
                )
        plans.append(plan)
    return order_continuations(plans)


def continued_in_batch(plans: list[TrackPlan]) -> dict[int, int]:
    """``{index of a plan: index of the plan of this list whose output it continues}``.

    Such a track may only start once the one it continues is written (a scheduler running
    tracks at once must wait for it), and fails when that one failed in this run.
    """
    by_name = {p.spec.name: i for i, p in enumerate(plans)}
    return {
        i: by_name[p.continuation.track]
        for i, p in enumerate(plans)
        if p.continuation is not None and p.continuation.track in by_name and by_name[p.continuation.track] != i
    }


def source_failed(plan: TrackPlan, source: TrackPlan, source_results: list[TrackResult]) -> TrackResult | None:
    """The failed result of ``plan`` when the take it continues (``source``'s first) failed in this run, else None.

    Continuing the previous run's file instead would silently join two runs' music.
    """
    # a whole track that failed is one result under the track's name, not one per take
    if any(r.ok and r.name == source.takes[0] for r in source_results):
        return None
    error = (
        f"it continues {source.spec.name}, which failed in this run; "
        f"fix {source.spec.name} and render both again"
    )
    return TrackResult(name=plan.spec.name, settings=plan.settings, seed_was_random=plan.seed_was_random, error=error)


def order_continuations(plans: list[TrackPlan]) -> list[TrackPlan]:
    """Plans in render order: a track that continues another of the batch comes after it.

    A ``continue_from`` naming a track of this batch points at that track's output
    folder (the file appears when it renders); one naming a track outside the batch
    needs that track's finished output already on disk.

    Raises:
        SettingsError: the continuations form a cycle, or a continued output is missing.
    """
    from tydust_gen.runs.pipeline import continuation_output

    by_name = {p.spec.name: p for p in plans}
    fixed: dict[str, TrackPlan] = {}
    for plan in plans:
        cont = plan.continuation
        if cont is not None and cont.track is not None:
            source = by_name.get(cont.track)
            if source is not None:
                cont = replace(cont, path=continuation_output(source.out_dir, source.takes[0]))
            elif not cont.path.is_file():
                raise SettingsError(
                    f"{plan.spec.path}: continue_from = {cont.track!r} but {cont.path} does not exist; "
                    f"render {cont.track} first or add it to this batch"
                )
            plan = replace(plan, continuation=cont)
        fixed[plan.spec.name] = plan
    ordered: list[TrackPlan] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            loop = " → ".join([*chain[chain.index(name) :], name])
            raise SettingsError(f"continue_from makes a cycle ({loop}); one of these tracks must start fresh")
        state[name] = "visiting"
        cont = fixed[name].continuation
        if cont is not None and cont.track in fixed:
            visit(cont.track, [*chain, name])
        state[name] = "done"
        ordered.append(fixed[name])

    for plan in plans:
        visit(plan.spec.name, [])
    return ordered


def check_memory(source, device, plans: list[TrackPlan], what: str) -> None:
    """Refuse, before loading, a model this device has no room for (weights + cache + decode).

    Raises:
        DeviceError: the estimate is above the free memory (the message gives both).
    """
    from tydust_gen.model import memory

    config = memory.config_for(source)
    if config is None:
        return  # the load says what is wrong with the snapshot
    # CFG doubles the rows; a loop generates an overrun past --duration (at most a few bars, counted as 30 s)
    rows = max(2 * len(p.takes) for p in plans)
    duration = max(p.settings.duration_s + (30.0 if p.mastering.loop else 0.0) for p in plans)
    need = memory.estimate_for_config(config, dtype_bytes=2 if device.type == "cuda" else 4, rows=rows, duration_s=duration)
    memory.check_fits(need, device, what=what)



def prepare_cpu_kernel(listener: RunListener) -> None:
    """Build the CPU decode kernel now (first CPU run only), saying so, instead of silently inside the first track."""
    from tydust_gen.model import cpu_kernel

    if cpu_kernel.pending_build():
        listener.info("building the CPU decode kernel (once per machine, about 10–25 s)…")
    state = cpu_kernel.load()
    if not state.available and not cpu_kernel.turned_off():
        listener.warn(f"CPU decode kernel not in use ({state.detail}); decoding on MKL instead, about 1.3x slower")


def render_planned(
    loaded: LoadedModel,
    plan: TrackPlan,
    *,
    backend: CodeBackend,
    ffmpeg: Ffmpeg,
    force: bool,
    identity: dict[str, Any] | None,
    listener: RunListener,
) -> list[TrackResult]:
    """Render one planned track; a TrackError becomes a failed result (the batch goes on)."""
    name = plan.spec.name
    try:
        with listener.track(name) as (progress, stage):
            takes = render_takes(
                loaded, plan, backend=backend, ffmpeg=ffmpeg, progress=progress, stage=stage,
                overwrite=force, record_model=identity,
            )  # fmt: skip
    except TydustError as exc:
        listener.track_failed(name, str(exc))
        return [TrackResult(name=name, settings=plan.settings, seed_was_random=plan.seed_was_random, error=str(exc))]
    warn_loudness(takes, listener)
    return takes


def warn_loudness(takes: list[TrackResult], listener: RunListener) -> None:
    """Say when a finished take missed its loudness target or its true-peak ceiling."""
    for r in takes:
        if r.loudness and not r.loudness["ceiling_met"]:
            listener.warn(f"{r.name}: the encoded files peak above {r.loudness['ceiling_dbtp']:g} dBTP after 3 tries")
        if r.loudness and not r.loudness["target_reached"]:
            listener.warn(
                f"{r.name}: reached {r.loudness['output_lufs']} LUFS, not {r.loudness['target_lufs']:g}, "
                f"within the {r.loudness['ceiling_dbtp']:g} dBTP ceiling"
            )


def run_batch(request: BatchRequest, listener: RunListener | None = None, *, scale: ScaleOut | None = None) -> BatchResult:
    """Plan, check, lock, load the model once, and render every track that needs it.

    A track that fails is reported through ``listener.track_failed`` and the
    batch goes on; its result has ``ok`` False. With ``scale`` the locked tracks
    are rendered by its workers instead of by a model loaded here (planning,
    seeds, skipping and locks stay in this process).

    Raises:
        UsageError, EnvironmentProblem, TrackBusyError: before any track renders.
    """
    from tydust_gen.base import faults
    from tydust_gen.model import loading
    from tydust_gen.model.backends import make_backend
    from tydust_gen.runs.locks import TrackLocks

    listener = listener or RunListener()
    started = time.perf_counter()
    plans = plan_tracks(request)
    ffmpeg = find_ffmpeg()
    check_encoders(ffmpeg)
    device, fell_back = (None, False) if scale else loading.resolve_device(request.device_name)
    # checked before the model loads (a bad name fails in a second); the Ray workers keep "auto"
    dtype = None if device is None else loading.resolve_dtype(request.dtype_name, device)
    if scale and loading.check_dtype_name(request.dtype_name) != "auto":
        raise SettingsError("--dtype is not passed to Ray workers yet (they use auto); leave it out with --workers/--ray")
    if device is not None and device.type != "cpu" and any(p.settings.backend == "fast-int8" for p in plans):
        raise DeviceError("--backend fast-int8 runs on the CPU only; use --backend fast on a GPU, or --device cpu")
    source = loading.resolve_source(request.model_ref)
    family_of = {"model_ref": request.model_ref, "cli_settings": request.cli_settings}
    plans = fit_model_family(plans, loading.peek_family(source), **family_of)
    identity = provenance.model_identity(source)
    plans_in_order = list(plans)
    plans, skipped = select(plans, force=request.force, skip_existing=request.skip_existing, model=identity)
    results = [r for s in skipped for r in skipped_results(s)]
    statuses = {r.name: "skipped" for r in results}
    load_s = 0.0
    if plans:
        with TrackLocks() as track_locks:
            for plan in plans:
                track_locks.acquire_takes(plan.out_dir, plan.spec.name, plan.takes)
            if scale is not None:
                rendered, device, load_s = scale.render(
                    plans, source=source, identity=identity, ffmpeg=ffmpeg, force=request.force, listener=listener
                )
                results.extend(rendered)
            else:
                check_memory(source, device, plans, request.model_ref)
                if fell_back:
                    listener.warn("no CUDA GPU found; generating on the CPU, which is much slower")
                listener.info(f"loading {request.model_ref} on {device}…")
                faults.hook("loading")
                t_load = time.perf_counter()
                # The CLI's reporter is `interactive` on a terminal without --quiet: then the first
                # run's ~2.4 GB download shows the hub's progress bars instead of looking hung.
                loaded = loading.load_model(source, device, dtype=dtype, show_download_progress=listener.interactive)
                load_s = time.perf_counter() - t_load
                plans = fit_model_family(plans, loaded.family, **family_of)
                check_prompt_lengths(loaded, plans)
                if loaded.device.type == "cpu" and any(p.settings.backend == "fast" for p in plans):
                    prepare_cpu_kernel(listener)
                # One backend per name for this batch: its prepared weights are built once per model.
                backends: dict[str, CodeBackend] = {}
                sources = continued_in_batch(plans)
                rendered_by_index: dict[int, list[TrackResult]] = {}
                for index, plan in enumerate(plans):
                    src = sources.get(index)
                    failed = None if src is None else source_failed(plan, plans[src], rendered_by_index[src])
                    if failed is not None:
                        listener.track_failed(plan.spec.name, failed.error)
                        rendered_by_index[index] = [failed]
                        results.append(failed)
                        continue
                    backend = backends.setdefault(
                        plan.settings.backend, make_backend(plan.settings.backend, self_check=True, warn=listener.warn)
                    )
                    rendered_by_index[index] = render_planned(
                        loaded, plan, backend=backend, ffmpeg=ffmpeg, force=request.force, identity=identity, listener=listener
                    )
                    results.extend(rendered_by_index[index])
    # Report in the order the tracks were named (skipped ones were set aside first).
    position = {name: i for i, p in enumerate(plans_in_order) for name in (p.spec.name, *p.takes)}
    results.sort(key=lambda r: position.get(r.name, len(position)))
    for r in results:
        statuses.setdefault(r.name, "ok" if r.ok else "failed")
    # scale with every track skipped: no worker was started, so there is no device to name
    device_text = "not started" if device is None else str(device)
    dtype_text = None if dtype is None else loading.dtype_name(dtype)
    return BatchResult(results, statuses, device_text, load_s, time.perf_counter() - started, dtype_text)


def track_json(r: TrackResult, status: str | None = None) -> dict[str, Any]:
    """One take as ``--json`` prints it (with its batch status and record path when ``status`` is given)."""
    s = r.settings
    d: dict[str, Any] = {
        "track": r.name,
        "ok": r.ok,
        "error": r.error,
        "seed": s.seed if s else None,
        "seed_was_random": r.seed_was_random,
        "duration_s": s.duration_s if s else None,
        "settings": None
        if s is None
        else {
            "window_s": s.window_s,
            "stride_s": s.stride_s,
            "do_sample": s.sampling.do_sample,
            "temperature": s.sampling.temperature,
            "top_k": s.sampling.top_k,
            "top_p": s.sampling.top_p,
            "guidance_scale": s.sampling.guidance_scale,
            "backend": s.backend,
        },
        "files": [{**provenance.to_jsonable(f), "duration_s": round(f.duration_s, 4)} for f in r.files],
        "take": r.take,
        "takes": r.takes,
        "batch_seed": r.batch_seed,
        "loudness": r.loudness,
        "loop": r.loop,
        "preview": str(r.preview) if r.preview else None,
        "steps": r.steps,
        "windows": r.windows,
        "sections": r.sections,
        "model_family": r.model_family,
        "continuation": r.continuation,
        "melody": r.melody,
        "timings_s": {k: round(v, 3) for k, v in r.timings.items()},
        "decode_path": r.decode_path,
    }
    if status is not None:
        d["status"] = status
        d["provenance"] = str(provenance.record_path(r.files[0].path.parent, r.name)) if r.files else None
    return d
