"""The Typer app: ``tydust-gen TRACK...`` is short for ``tydust-gen generate TRACK...``."""

from __future__ import annotations

import contextlib
import os
import sys

import click
import typer
from typer.core import TyperGroup

from tydust_gen import __version__
from tydust_gen.base.errors import EXIT_SIGINT, EXIT_SIGTERM

DEFAULT_COMMAND = "generate"


class _DefaultCommandGroup(TyperGroup):
    """Route ``tydust-gen TRACK ...`` to the ``generate`` command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)


class _ProgramApp(typer.Typer):
    """The Typer app; when run as a program, an interrupted run leaves without the interpreter's teardown.

    After Ctrl-C or SIGTERM every ``finally`` has run (staging folders, locks, ffmpeg
    children) and the one-line message is printed. What is left is CPython's
    shutdown: garbage collection over torch's and transformers' objects, 2.4 s of
    CPU measured with only the tiny model loaded, and a wait for any worker still
    inside a torch call (:func:`tydust_gen.base.signals.interruptible`). ``os._exit``
    skips both. Typer's test runner invokes the command without ``__call__``, so
    in-process tests never exit this way.
    """

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except SystemExit as exc:
            if exc.code in (EXIT_SIGINT, EXIT_SIGTERM):
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                os._exit(exc.code)
            raise


app = _ProgramApp(
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
