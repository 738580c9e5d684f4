"""``tydust-gen doctor``: is this machine ready (torch/CUDA, ffmpeg, model cache, disk)?"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from tydust_gen.base.errors import EXIT_ENVIRONMENT
from tydust_gen.cli.main import app
from tydust_gen.cli.output import Reporter, check_table, print_json
from tydust_gen.model.loading import DEFAULT_MODEL


@app.command("doctor")
def doctor_cmd(
    model: str = typer.Option(DEFAULT_MODEL, "--model", envvar="TYDUST_MODEL", metavar="TEXT", help="Model to look for (hub id or folder)."),
    out_dir: Path = typer.Option(Path("assets/music"), "--out-dir", "-o", metavar="PATH", help="Output folder whose free space is reported."),
    device: str = typer.Option(
        "auto", "--device", metavar="TEXT", help="Device to check (auto, cpu, cuda, cuda:N); --selftest runs there (default: CPU)."
    ),
    selftest: bool = typer.Option(False, "--selftest", help="Also generate a 1 s track on a tiny random model in a temp folder (no download)."),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON on stdout."),
) -> None:
    """Check torch/CUDA, ffmpeg, the model cache and disk space; exit 3 if something required is missing."""
    from tydust_gen.runs import doctor

    rep = Reporter(quiet=False)
    checks = doctor.run_checks(model, out_dir, device)
    if selftest:
        rep.info("running the self-test on a tiny random model…")
        checks.append(doctor.selftest("cpu" if device.strip().lower() == "auto" else device))
    bad = [c for c in checks if not c.ok and c.required]
    if as_json:
        print_json({"ok": not bad, "checks": [c.__dict__ for c in checks]})
    marks = {True: Text("ok", style="green")}
    rows = [
        (marks.get(c.ok) or (Text("FAIL", style="bold red") if c.required else Text("warn", style="yellow")), c.name, c.detail)
        for c in checks
    ]
    check_table(rows, rep)
    raise typer.Exit(EXIT_ENVIRONMENT if bad else 0)
