"""``tydust-gen list``: the tracks of the prompts folder and whether their outputs are current."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from tydust_gen.cli.main import app
from tydust_gen.cli.output import Reporter, check_table, guarded, print_json
from tydust_gen.model.loading import DEFAULT_MODEL

STATUS_STYLES = {"current": "green", "missing": "dim", "stale": "yellow", "no record": "yellow", "invalid": "bold red"}


@app.command("list")
def list_cmd(
    prompts_dir: Path = typer.Option(Path("prompts"), "--prompts-dir", envvar="TYDUST_PROMPTS_DIR", metavar="PATH", help="Folder of prompt files."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", "-o", metavar="PATH", help="Output folder (default: as generate)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", envvar="TYDUST_MODEL", metavar="TEXT", help="Model a current take must have used."),
    as_json: bool = typer.Option(False, "--json", help="Print the list as JSON on stdout."),
) -> None:
    """List the tracks in the prompts folder: duration, and whether outputs exist and are current."""
    from tydust_gen.runs.listing import list_prompts_folder

    rep = Reporter(quiet=False)

    def body() -> int:
        listing = list_prompts_folder(prompts_dir, out_dir, model)
        rows = listing.tracks
        if as_json:
            print_json({
                "tracks": [{**r.__dict__, "out_dir": str(r.out_dir) if r.out_dir else None} for r in rows],
                "leftovers": [{**x.__dict__, "path": str(x.path)} for x in listing.leftovers],
            })  # fmt: skip
        for x in listing.leftovers:
            rep.warn(f"{x.path} was left by a killed run of {x.take} and cannot be removed ({x.reason}); delete it")
        if not rows:
            rep.info(f"{prompts_dir}/ has no .toml or .txt prompt files")
            return 0
        table = [
            (r.name, f"{r.duration_s:g} s" if r.duration_s is not None else "-", str(r.out_dir) if r.out_dir else "-",
             Text(r.status, style=STATUS_STYLES[r.status]), r.detail)  # fmt: skip
            for r in rows
        ]
        check_table(table, rep, header=("track", "duration", "outputs", "status", "detail"))
        return 0

    guarded(rep, False, body)
