"""What every command shares: the reporter on stderr, the error guard, summaries and JSON on stdout.

Human output (progress, warnings, the summary) goes to stderr; ``--json``
prints one machine-readable object on stdout. Expected failures print one line
and exit with the code documented in :mod:`tydust_gen.base.errors`; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from typing import Any, Callable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tydust_gen.audio.loop import loop_summary
from tydust_gen.base.errors import EXIT_SIGINT, EXIT_SIGTERM, TydustError
from tydust_gen.runs.batch import RunListener
from tydust_gen.runs.pipeline import TrackResult


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM so ``finally`` blocks clean up as for Ctrl-C."""


def _on_sigterm(signum, frame):  # pragma: no cover - exercised through subprocess tests
    raise Terminated()


class Reporter(RunListener):
    """Everything the user sees on stderr; silent when piped (for progress) or --quiet."""

    def __init__(self, quiet: bool = False):
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

    def track_failed(self, name: str, message: str) -> None:
        self.error(f"{name}: {message}")

    @contextlib.contextmanager
    def track(self, name: str) -> Iterator[tuple[Any, Any]]:
        """A progress bar for one track on a terminal; nothing when piped or quiet."""
        if not self.interactive:
            yield None, None
            return
        bar = Progress(
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
        with bar:
            task = bar.add_task(name, total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            def stage(what: str) -> None:
                bar.update(task, description=f"{name}: {what}")

            yield progress, stage


def guarded(rep: Reporter, debug: bool, body: Callable[[], int], *, as_json: bool = False) -> None:
    """Run a command's ``body`` with one error, Ctrl-C and SIGTERM policy, then exit with its code.

    A :class:`TydustError` prints its one line (``--debug``: the traceback) and
    exits with its code; Ctrl-C exits 130, SIGTERM 143. With ``as_json`` a run
    that stops early still prints one JSON object (see :func:`json_failure`).
    """
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = body()
    except TydustError as exc:
        if debug:
            raise
        rep.error(str(exc))
        code = json_failure(as_json, exc.exit_code, str(exc))
    except KeyboardInterrupt:
        rep.error("interrupted; unfinished tracks were not written")
        code = json_failure(as_json, EXIT_SIGINT, "interrupted")
    except Terminated:
        rep.error("terminated; unfinished tracks were not written")
        code = json_failure(as_json, EXIT_SIGTERM, "terminated")
    finally:
        signal.signal(signal.SIGTERM, old_term)
    raise typer.Exit(code)


def json_failure(as_json: bool, code: int, message: str) -> int:
    """With ``--json``, a run that stops early still prints one object: ``ok`` false, the exit code and why.

    ``tracks`` is empty: tracks finished before an interrupt are on disk with their records.
    """
    if as_json:
        print_json({"ok": False, "exit_code": code, "error": message, "tracks": []})
    return code


def print_json(payload: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    sys.stdout.flush()


def human_size(n: float) -> str:
    """``812 B``, ``2.2 MB``: decimal units, as file managers show them."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def take_details(rep: Reporter, r: TrackResult) -> None:
    """The lines under a finished take's headline (``generate`` and ``master`` alike): loudness and
    true peak as measured on the encoded files, the loop, the preview, and each file written."""
    if r.loudness:
        peaks = ", ".join(f"{k} {v} dBTP" for k, v in r.loudness["encoded_true_peak_dbtp"].items())
        rep.info(f"  loudness {r.loudness['output_lufs']} LUFS, true peak {peaks}")
    if r.loop:
        rep.info(f"  {loop_summary(r.loop)}")
    if r.preview:
        rep.info(f"  {r.preview}")
    for f in r.files:
        rep.info(
            f"  {f.path}  {f.duration_s:.2f} s  {human_size(f.size_bytes)}  {f.bitrate_bps / 1000:.0f} kbit/s"
            f"{' CBR' if f.format == 'mp3' else ' nominal'}  {f.sample_rate} Hz {f.channels} ch"
        )


def summary(rep: Reporter, results: list[TrackResult], total_s: float) -> None:
    """What each finished take is, on stderr. Failed tracks were reported when they failed."""
    for r in results:
        if not r.ok:
            continue
        if not r.steps:
            rep.info(f"{r.name}: skipped, outputs are current")
            continue
        seed_note = " (random)" if r.seed_was_random else ""
        take_note = f", take {r.take}/{r.takes} of batch seed {r.batch_seed}" if r.takes > 1 else ""
        rep.info(f"{r.name}: seed {r.settings.seed}{seed_note}{take_note}, {r.steps} steps in {r.windows} window(s), {r.timings['total']:.1f} s")
        take_details(rep, r)
    ok = sum(r.ok for r in results)
    rep.info(f"done: {ok}/{len(results)} track(s) in {total_s:.1f} s")


def summary_table(rep: Reporter, results: list[TrackResult], statuses: dict[str, str]) -> None:
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


def check_table(rows: list[tuple[str, str, str]], rep: Reporter, header: tuple[str, ...] | None = None) -> None:
    """A plain table of text cells on stderr (``doctor``, ``list``); cells are text, never markup."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    table = Table(box=box.SIMPLE, show_edge=False, pad_edge=False, show_header=header is not None)
    for col in header or ("",) * (len(rows[0]) if rows else 0):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*(c if isinstance(c, Text) else Text(str(c)) for c in row))
    rep.console.print(table)
