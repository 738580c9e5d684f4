"""The Typer app: ``tydust-gen TRACK...`` is short for ``tydust-gen generate TRACK...``."""

from __future__ import annotations

import click
import typer
from typer.core import TyperGroup

from tydust_gen import __version__

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
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Generate game music with MusicGen: prompts/TRACK.toml → TRACK.mp3 (192k CBR) + TRACK.ogg (q6), 44.1 kHz stereo.",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"tydust-gen {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Show the version."),
) -> None:
    """Generate game music with MusicGen."""
