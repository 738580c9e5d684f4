"""``tydust-gen regenerate TRACK.json``: make a recorded take again and say whether it came out the same."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tydust_gen.base.errors import EXIT_TRACK_FAILED
from tydust_gen.cli.main import app
from tydust_gen.cli.output import Reporter, guarded, print_json, summary
from tydust_gen.runs.batch import track_json


@app.command("regenerate")
def regenerate_cmd(
    record: Path = typer.Argument(..., metavar="TRACK.json", show_default=False, help="A provenance record written beside a track."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", "-o", metavar="PATH", help="Where to write the new take (default: beside the record)."),
    model: Optional[str] = typer.Option(None, "--model", metavar="TEXT", help="Use this model instead of the recorded one."),
    device: Optional[str] = typer.Option(None, "--device", metavar="TEXT", help="Use this device instead of the recorded one (tokens may then differ)."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace existing outputs (default: refuse)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Errors only."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable result on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    """Make a recorded take again from its NAME.json (same prompt, settings, seed, model, device, dtype)."""
    from tydust_gen.runs.regenerate import regenerate_take

    rep = Reporter(quiet)

    def body() -> int:
        done = regenerate_take(record, out_dir=out_dir, model_ref=model, device_name=device, force=force, listener=rep)
        result = done.result
        if as_json:
            print_json({**track_json(result), "comparison": {c.format: c.verdict for c in done.comparisons}})
        summary(rep, [result], done.total_s)
        for c in done.comparisons:
            rep.info(f"{result.name}.{c.format}: {c.verdict} {'to' if c.verdict == 'identical' else 'vs'} the recorded take")
        return 0 if result.ok else EXIT_TRACK_FAILED

    guarded(rep, debug, body)
