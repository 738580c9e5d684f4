"""Command line: parse, check, print, exit. All the work happens in the core modules.

``tydust-gen TRACK...`` is short for ``tydust-gen generate TRACK...``. Human
output (progress, warnings, the summary) goes to stderr; ``--json`` prints one
machine-readable object on stdout. Expected failures print one line and exit
with the code documented in :mod:`tydust_gen.errors`; ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, List, Optional

import click
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from typer.core import TyperGroup

from . import __version__
from .errors import EXIT_SIGINT, EXIT_SIGTERM, EXIT_TRACK_FAILED, DeviceError, TydustError, UsageError
from .settings import MAX_DURATION_S

DEFAULT_COMMAND = "generate"


class _DefaultCommandGroup(TyperGroup):
    """Route ``tydust-gen TRACK ...`` to the ``generate`` command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_DefaultCommandGroup,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Generate game music with MusicGen: prompts/TRACK.toml → TRACK.mp3 (192k CBR) + TRACK.ogg (q6), 44.1 kHz stereo.",
)


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so ``finally`` blocks clean up as for Ctrl-C."""


def _on_sigterm(signum, frame):  # pragma: no cover - exercised through subprocess tests
    raise Terminated()


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"tydust-gen {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Show the version."),
) -> None:
    """Generate game music with MusicGen."""


class _Reporter:
    """Everything the user sees on stderr; silent when piped (for progress) or --quiet."""

    def __init__(self, quiet: bool):
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.quiet = quiet
        self.interactive = self.console.is_terminal and not quiet

    def info(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False)

    def warn(self, text: str) -> None:
        if self.quiet:
            return
        self.console.print(f"warning: {text}", markup=False, style="yellow")

    def error(self, text: str) -> None:
        self.console.print(f"error: {text}", markup=False, style="bold red")

    def progress(self) -> Progress | None:
        if not self.interactive:
            return None
        return Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def _result_json(r) -> dict[str, Any]:
    s = r.settings
    return {
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
        "files": [
            {
                "path": str(f.path),
                "format": f.format,
                "duration_s": round(f.duration_s, 4),
                "size_bytes": f.size_bytes,
                "bitrate_bps": f.bitrate_bps,
                "sample_rate": f.sample_rate,
                "channels": f.channels,
                "sha256": f.sha256,
            }
            for f in r.files
        ],
        "take": r.take,
        "takes": r.takes,
        "batch_seed": r.batch_seed,
        "loudness": r.loudness,
        "loop": r.loop,
        "preview": str(r.preview) if r.preview else None,
        "steps": r.steps,
        "windows": r.windows,
        "timings_s": {k: round(v, 3) for k, v in r.timings.items()},
    }


@app.command(DEFAULT_COMMAND)
def generate_cmd(
    tracks: Optional[List[str]] = typer.Argument(None, metavar="TRACK...", help="Track names: prompts/TRACK.toml or prompts/TRACK.txt."),
    all_tracks: bool = typer.Option(False, "--all", help="Every prompt file in the prompts folder."),
    skip_existing: bool = typer.Option(
        False, "--skip-existing", help="Skip tracks whose outputs are complete and match their provenance record (prompt, settings, model)."
    ),
    duration: Optional[str] = typer.Option(
        None, "--duration", "-d", help=f"Seconds of music (default: prompt file, else 30; max {MAX_DURATION_S:g})."
    ),
    seed: Optional[str] = typer.Option(None, "--seed", help="Seed for a reproducible take on the same device (default: random, reported)."),
    temperature: Optional[str] = typer.Option(None, "--temperature", help="Sampling temperature, > 0 (default 1.0)."),
    top_k: Optional[str] = typer.Option(None, "--top-k", help="Sample among the k likeliest tokens; 0 = off (default 250)."),
    top_p: Optional[str] = typer.Option(
        None, "--top-p", help="Nucleus sampling when > 0; 0.0 means OFF, not greedy (default 0.0). When > 0 it replaces top-k."
    ),
    guidance: Optional[str] = typer.Option(None, "--guidance", help="Classifier-free guidance scale; <= 1 turns it off (default 3.0)."),
    greedy: bool = typer.Option(False, "--greedy", help="Always take the likeliest token instead of sampling."),
    window: Optional[str] = typer.Option(None, "--window", help="Seconds generated per pass (default 30, the model's training span)."),
    stride: Optional[str] = typer.Option(
        None, "--stride", help="Seconds each further pass advances; the rest of the window is re-fed as context (default 18)."
    ),
    backend: Optional[str] = typer.Option(
        None,
        "--backend",
        help="Decode loop: fast (default; same tokens as stock), fast-int8 (CPU, ~3x faster, small quality cost) or stock (transformers' generate).",
    ),
    model: str = typer.Option(
        "facebook/musicgen-small", "--model", envvar="TYDUST_MODEL", help="Hub id (uses the HF cache; honours HF_HUB_OFFLINE) or a local snapshot folder."
    ),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cuda or cpu."),
    prompts_dir: Path = typer.Option(Path("prompts"), "--prompts-dir", envvar="TYDUST_PROMPTS_DIR", help="Folder of prompt files."),
    out_dir: Optional[Path] = typer.Option(
        None, "--out-dir", "-o", help="Output folder (default assets/music/<genre>/ when the prompt file names one, else assets/music/)."
    ),
    loudness: Optional[str] = typer.Option(
        None, "--loudness", help="Integrated loudness target in LUFS, or 'off' (default -14). Peaks still respect --true-peak."
    ),
    true_peak: Optional[str] = typer.Option(
        None, "--true-peak", help="True-peak ceiling in dBTP, checked on the decoded MP3 and OGG (default -1.0)."
    ),
    fade_in: Optional[str] = typer.Option(None, "--fade-in", help="Equal-power fade-in, seconds (default 0)."),
    fade_out: Optional[str] = typer.Option(None, "--fade-out", help="Equal-power fade-out, seconds (default 0)."),
    loop: bool = typer.Option(
        False, "--loop", help="Seamless loop of exactly --duration; LOOPSTART/LOOPLENGTH tags in the OGG. No fades."
    ),
    variations: Optional[str] = typer.Option(
        None, "--variations", "-n", help="Takes generated in one batch, written as TRACK_v1, TRACK_v2... (default 1)."
    ),
    preview: bool = typer.Option(False, "--preview", help="Also write TRACK.png: waveform and spectrogram (needs matplotlib)."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace existing outputs (default: refuse)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, warnings or summary; errors only."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable result on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    """Generate tracks from their prompt files (the default command)."""
    rep = _Reporter(quiet)
    cli_settings = {
        "duration": duration,
        "seed": seed,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "guidance_scale": guidance,
        "window": window,
        "stride": stride,
        "do_sample": False if greedy else None,
        "backend": backend,
        "loudness": loudness,
        "true_peak": true_peak,
        "fade_in": fade_in,
        "fade_out": fade_out,
        "loop": True if loop else None,
        "variations": variations,
        "preview": True if preview else None,
    }
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = _run(rep, tracks, cli_settings, model, device, prompts_dir, out_dir, force, as_json, all_tracks, skip_existing)
    except TydustError as exc:
        if debug:
            raise
        rep.error(str(exc))
        code = _json_failure(as_json, exc.exit_code, str(exc))
    except KeyboardInterrupt:
        rep.error("interrupted; unfinished tracks were not written")
        code = _json_failure(as_json, EXIT_SIGINT, "interrupted")
    except Terminated:
        rep.error("terminated; unfinished tracks were not written")
        code = _json_failure(as_json, EXIT_SIGTERM, "terminated")
    finally:
        signal.signal(signal.SIGTERM, old_term)
    raise typer.Exit(code)


def _prepare_cpu_kernel(rep) -> None:
    """Build the CPU decode kernel now (first CPU run only), saying so, instead of silently inside the first track."""
    from . import cpu_kernel

    if cpu_kernel.pending_build():
        rep.info("building the CPU decode kernel (once per machine, about 10–25 s)…")
    state = cpu_kernel.load()
    if not state.available and not cpu_kernel.turned_off():
        rep.warn(f"CPU decode kernel not in use ({state.detail}); decoding on MKL instead, about 1.3x slower")


def _json_failure(as_json: bool, code: int, message: str) -> int:
    """With ``--json``, a run that stops early still prints one object: ``ok`` false, the exit code and why.

    ``tracks`` is empty: tracks finished before an interrupt are on disk with their records.
    """
    if as_json:
        payload = {"ok": False, "exit_code": code, "error": message, "tracks": []}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        sys.stdout.flush()
    return code


def _run(rep, tracks, cli_settings, model_ref, device_name, prompts_dir, out_dir, force, as_json, all_tracks=False, skip_existing=False) -> int:
    from . import batch, engine, export, faults, locking, pipeline, provenance

    tracks = batch.track_names(tracks, all_tracks, prompts_dir)

    started = time.perf_counter()
    # Everything that can fail without the model fails here, in a second.
    plans = []
    seen: set[str] = set()
    for name in tracks:
        plan = pipeline.plan_track(
            name, cli_settings=cli_settings, prompts_dir=prompts_dir, out_dir=out_dir, overwrite=force or skip_existing
        )
        key = str(plan.outputs["mp3"].resolve())
        if key in seen:
            raise UsageError(f"track {name!r} is listed twice; name each track once")
        seen.add(key)
        plans.append(plan)
    ffmpeg = export.find_ffmpeg()
    export.check_encoders(ffmpeg)
    device, fell_back = engine.resolve_device(device_name)
    if device.type != "cpu" and any(p.settings.backend == "fast-int8" for p in plans):
        raise DeviceError("--backend fast-int8 runs on the CPU only; use --backend fast on a GPU, or --device cpu")
    source = engine.resolve_source(model_ref)
    identity = provenance.model_identity(source)
    plans_in_order = list(plans)
    plans, skipped = batch.select(plans, force=force, skip_existing=skip_existing, model=identity)
    results = [r for s in skipped for r in batch.skipped_results(s)]
    statuses = {r.name: "skipped" for r in results}
    load_s = 0.0
    if plans:
        with locking.TrackLocks() as locks:
            for plan in plans:
                locks.acquire(plan.out_dir, plan.spec.name)
            if fell_back:
                rep.warn("no CUDA GPU found; generating on the CPU, which is much slower")
            rep.info(f"loading {model_ref} on {device.type}…")
            faults.hook("loading")
            t_load = time.perf_counter()
            loaded = engine.load_model(source, device)
            load_s = time.perf_counter() - t_load
            batch.check_prompt_lengths(loaded, plans)
            if loaded.device.type == "cpu" and any(p.settings.backend == "fast" for p in plans):
                _prepare_cpu_kernel(rep)
            for plan in plans:
                results.extend(_render_one(rep, loaded, plan, ffmpeg, force, identity))
    # Report in the order the tracks were named (skipped ones were set aside first).
    position = {name: i for i, p in enumerate(plans_in_order) for name in (p.spec.name, *p.takes)}
    results.sort(key=lambda r: position.get(r.name, len(position)))
    total_s = time.perf_counter() - started
    for r in results:
        statuses.setdefault(r.name, "ok" if r.ok else "failed")

    failed = [r for r in results if not r.ok]
    if as_json:
        payload = {
            "ok": not failed,
            "model": model_ref,
            "device": str(device),
            "load_s": round(load_s, 3),
            "total_s": round(total_s, 3),
            "tracks": [_with_status(_result_json(r), statuses[r.name], r) for r in results],
        }
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        sys.stdout.flush()
    _summary(rep, results, total_s)
    _summary_table(rep, results, statuses)
    return EXIT_TRACK_FAILED if failed else 0


def _with_status(d: dict[str, Any], status: str, r) -> dict[str, Any]:
    """Add the batch status (ok, skipped, failed) and the provenance record path to a track's JSON."""
    from .provenance import record_path

    d["status"] = status
    d["provenance"] = str(record_path(r.files[0].path.parent, r.name)) if r.files else None
    return d


def _summary_table(rep, results, statuses: dict[str, str]) -> None:
    """One row per track on stderr: status, seed, length, time, and the files or the error."""
    if rep.quiet or not results:
        return
    from rich import box
    from rich.table import Table
    from rich.text import Text

    # light rules: the heavy "━" is the progress bar's, and piped output must not look like one
    table = Table(title=None, box=box.SIMPLE, show_edge=False, pad_edge=False)
    for col in ("track", "status", "seed", "length", "time", "outputs / error"):
        table.add_column(col, overflow="fold")
    for r in results:
        status = statuses.get(r.name, "ok" if r.ok else "failed")
        style = {"ok": "green", "skipped": "cyan", "failed": "bold red"}.get(status, "")
        seed = str(r.settings.seed) if r.settings and r.settings.seed is not None else "-"
        length = f"{r.files[0].duration_s:.2f} s" if r.files else "-"
        took = f"{r.timings['total']:.1f} s" if "total" in r.timings else "-"
        what = r.error if not r.ok else ", ".join(f.path.name for f in r.files)
        # Text, not markup: an error message may contain [brackets]
        table.add_row(Text(r.name), Text(status, style=style), seed, length, took, Text(what or ""))
    rep.console.print(table)


def _render_one(rep, loaded, plan, ffmpeg, force, identity=None):
    from . import pipeline

    name = plan.spec.name
    bar = rep.progress()
    try:
        if bar is None:
            takes = pipeline.render_takes(loaded, plan, ffmpeg=ffmpeg, overwrite=force, record_model=identity)
        else:
            with bar:
                task = bar.add_task(name, total=None)

                def progress(done: int, total: int) -> None:
                    bar.update(task, completed=done, total=total)

                def stage(what: str) -> None:
                    bar.update(task, description=f"{name}: {what}")

                takes = pipeline.render_takes(
                    loaded, plan, ffmpeg=ffmpeg, progress=progress, stage=stage, overwrite=force, record_model=identity
                )
    except TydustError as exc:
        # One track failing does not stop the batch; the exit code reports it.
        rep.error(f"{name}: {exc}")
        return [pipeline.TrackResult(name=name, settings=plan.settings, seed_was_random=plan.seed_was_random, error=str(exc))]
    for r in takes:
        if r.loudness and not r.loudness["ceiling_met"]:
            rep.warn(f"{r.name}: the encoded files peak above {r.loudness['ceiling_dbtp']:g} dBTP after 3 tries")
        if r.loudness and not r.loudness["target_reached"]:
            rep.warn(
                f"{r.name}: reached {r.loudness['output_lufs']} LUFS, not {r.loudness['target_lufs']:g}, "
                f"within the {r.loudness['ceiling_dbtp']:g} dBTP ceiling"
            )
    return takes


def _summary(rep, results, total_s: float) -> None:
    for r in results:
        if not r.ok:
            rep.info(f"{r.name}: FAILED — {r.error}")
            continue
        if not r.steps:
            rep.info(f"{r.name}: skipped, outputs are current")
            continue
        seed_note = " (random)" if r.seed_was_random else ""
        take_note = f", take {r.take}/{r.takes} of batch seed {r.batch_seed}" if r.takes > 1 else ""
        rep.info(f"{r.name}: seed {r.settings.seed}{seed_note}{take_note}, {r.steps} steps in {r.windows} window(s), {r.timings['total']:.1f} s")
        if r.loudness:
            peaks = ", ".join(f"{k} {v} dBTP" for k, v in r.loudness["encoded_true_peak_dbtp"].items())
            rep.info(f"  loudness {r.loudness['output_lufs']} LUFS, true peak {peaks}")
        if r.loop:
            verdict = "seamless" if r.loop.get("seam_passed") else "audible seam"
            rep.info(f"  loop: LOOPSTART={r.loop['loop_start']} LOOPLENGTH={r.loop['loop_length']} ({verdict})")
        if r.preview:
            rep.info(f"  {r.preview}")
        for f in r.files:
            rep.info(
                f"  {f.path}  {f.duration_s:.2f} s  {_human_size(f.size_bytes)}  {f.bitrate_bps / 1000:.0f} kbit/s"
                f"{' CBR' if f.format == 'mp3' else ' nominal'}  {f.sample_rate} Hz {f.channels} ch"
            )
    ok = sum(r.ok for r in results)
    rep.info(f"done: {ok}/{len(results)} track(s) in {total_s:.1f} s")


from . import cli_tools  # noqa: E402,F401  (registers doctor, list and regenerate on ``app``)

if __name__ == "__main__":  # pragma: no cover
    app()
