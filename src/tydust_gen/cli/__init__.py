"""Command line: parse, check, print, exit. All the work happens in :mod:`tydust_gen.runs`.

One module per command (``generate``, ``doctor``, ``listing``, ``master``, ``regenerate``)
registers on the Typer app of :mod:`tydust_gen.cli.main`; :mod:`tydust_gen.cli.output`
holds what they share (the reporter on stderr, summaries, JSON, the error guard).
"""

from tydust_gen.cli import doctor, generate, listing, master, regenerate  # noqa: F401  (each registers its command)
from tydust_gen.cli.main import app

__all__ = ["app"]
