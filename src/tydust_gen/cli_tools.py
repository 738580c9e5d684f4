"""The commands besides ``generate``: ``doctor``, ``list`` and ``regenerate``.

They register on :data:`tydust_gen.cli.app`; like ``cli.py`` this is the only
place they print or exit. A track named like one of these commands must be
generated as ``tydust-gen generate doctor``.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.text import Text

from .cli import Terminated, _on_sigterm, _render_one, _Reporter, _result_json, _summary, app
from .errors import EXIT_ENVIRONMENT, EXIT_SIGINT, EXIT_SIGTERM, EXIT_TRACK_FAILED, TydustError


def _guarded(rep: _Reporter, debug: bool, body: Callable[[], int]) -> None:
    """Run ``body`` with the same error, Ctrl-C and SIGTERM handling as ``generate``, then exit."""
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = body()
    except TydustError as exc:
        if debug:
            raise
        rep.error(str(exc))
        code = exc.exit_code
    except KeyboardInterrupt:
        rep.error("interrupted; unfinished tracks were not written")
        code = EXIT_SIGINT
    except Terminated:
        rep.error("terminated; unfinished tracks were not written")
        code = EXIT_SIGTERM
    finally:
        signal.signal(signal.SIGTERM, old_term)
    raise typer.Exit(code)


@app.command("doctor")
def doctor_cmd(
    model: str = typer.Option("facebook/musicgen-small", "--model", envvar="TYDUST_MODEL", help="Model to look for (hub id or folder)."),
    out_dir: Path = typer.Option(Path("assets/music"), "--out-dir", "-o", help="Output folder whose free space is reported."),
    selftest: bool = typer.Option(False, "--selftest", help="Also generate a 1 s track on a tiny random model in a temp folder (no download)."),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON on stdout."),
) -> None:
    """Check torch/CUDA, ffmpeg, the model cache and disk space; exit 3 if something required is missing."""
    from . import doctor

    rep = _Reporter(quiet=False)
    checks = doctor.run_checks(model, out_dir)
    if selftest:
        rep.info("running the self-test on a tiny random model…")
        checks.append(doctor.selftest())
    bad = [c for c in checks if not c.ok and c.required]
    if as_json:
        sys.stdout.write(json.dumps({"ok": not bad, "checks": [c.__dict__ for c in checks]}, indent=2) + "\n")
    from rich.table import Table

    from rich import box

    table = Table(box=box.SIMPLE, show_edge=False, pad_edge=False, show_header=False)
    table.add_column("mark")
    table.add_column("check")
    table.add_column("detail", overflow="fold")
    for c in checks:
        mark = "[green]ok[/]" if c.ok else ("[bold red]FAIL[/]" if c.required else "[yellow]warn[/]")
        table.add_row(mark, c.name, Text(c.detail))
    rep.console.print(table)
    raise typer.Exit(EXIT_ENVIRONMENT if bad else 0)


@app.command("list")
def list_cmd(
    prompts_dir: Path = typer.Option(Path("prompts"), "--prompts-dir", envvar="TYDUST_PROMPTS_DIR", help="Folder of prompt files."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", "-o", help="Output folder (default: as generate)."),
    model: str = typer.Option("facebook/musicgen-small", "--model", envvar="TYDUST_MODEL", help="Model a current take must have used."),
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout."),
) -> None:
    """List the tracks in the prompts folder: duration, and whether outputs exist and are current."""
    from . import engine, listing, provenance

    rep = _Reporter(quiet=False)
    if not prompts_dir.is_dir():
        rep.error(f"prompts folder {prompts_dir}/ does not exist; create it or pass --prompts-dir")
        raise typer.Exit(2)
    try:
        identity: dict[str, Any] | None = provenance.model_identity(engine.resolve_source(model))
    except TydustError:
        identity = None  # model unavailable here: judge the takes by prompt, settings and files only
    rows = listing.list_tracks(prompts_dir, out_dir, identity)
    if as_json:
        payload = [{**r.__dict__, "out_dir": str(r.out_dir) if r.out_dir else None} for r in rows]
        sys.stdout.write(json.dumps({"tracks": payload}, indent=2) + "\n")
    from rich.table import Table

    from rich import box

    table = Table(box=box.SIMPLE, show_edge=False, pad_edge=False)
    for col in ("track", "duration", "outputs", "status", "detail"):
        table.add_column(col, overflow="fold")
    colors = {"current": "green", "missing": "dim", "stale": "yellow", "no record": "yellow", "invalid": "bold red"}
    for r in rows:
        dur = f"{r.duration_s:g} s" if r.duration_s is not None else "-"
        table.add_row(Text(r.name), dur, Text(str(r.out_dir) if r.out_dir else "-"), Text(r.status, style=colors[r.status]), Text(r.detail))
    if not rows:
        rep.info(f"{prompts_dir}/ has no .toml or .txt prompt files")
    else:
        rep.console.print(table)
    raise typer.Exit(0)


@app.command("regenerate")
def regenerate_cmd(
    record: Path = typer.Argument(..., metavar="TRACK.json", help="A provenance record written beside a track."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", "-o", help="Where to write the new take (default: beside the record)."),
    model: Optional[str] = typer.Option(None, "--model", help="Use this model instead of the recorded one."),
    device: Optional[str] = typer.Option(None, "--device", help="Use this device instead of the recorded one (tokens may then differ)."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace existing outputs (default: refuse)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Errors only."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable result on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    """Make a recorded take again from its NAME.json (same prompt, settings, seed, model, device, dtype)."""
    rep = _Reporter(quiet)
    _guarded(rep, debug, lambda: _regenerate(rep, record, out_dir, model, device, force, as_json))


def _regenerate(rep, record_file: Path, out_dir, model_ref, device_name, force, as_json) -> int:
    import time

    import torch

    from . import engine, export, faults, locking, provenance, regen

    started = time.perf_counter()
    data = provenance.read_record(record_file)
    plan = regen.plan_from_record(data, record_file, out_dir, force=force)
    ffmpeg = export.find_ffmpeg()
    export.check_encoders(ffmpeg)
    source = engine.resolve_source(model_ref or data["model"]["ref"])
    identity = provenance.model_identity(source)
    if not provenance.same_model(data.get("model", {}), identity):
        rep.warn(f"{source.ref} is not the recorded model; the new take will differ")
    device, _ = engine.resolve_device(device_name or data.get("device", "auto"))
    dtype = getattr(torch, data.get("dtype", ""), None) if device_name is None else None
    with locking.TrackLocks() as locks:
        locks.acquire(plan.out_dir, plan.spec.name)
        rep.info(f"loading {source.ref} on {device}…")
        faults.hook("loading")
        loaded = engine.load_model(source, device, dtype=dtype if isinstance(dtype, torch.dtype) else None)
        takes = _render_one(rep, loaded, plan, ffmpeg, force, identity)
    wanted = data.get("take") or plan.spec.name
    result = next((r for r in takes if r.name == wanted), takes[0])
    verdicts = regen.compare(data, record_file, result.files, ffmpeg) if result.ok else []
    if as_json:
        payload = _result_json(result)
        payload["comparison"] = {c.format: c.verdict for c in verdicts}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    _summary(rep, [result], time.perf_counter() - started)
    for c in verdicts:
        rep.info(f"{result.name}.{c.format}: {c.verdict} {'to' if c.verdict == 'identical' else 'vs'} the recorded take")
    return 0 if result.ok else EXIT_TRACK_FAILED
