"""``tydust-gen master FILE...``: the finishing stages (loop on the bar, loudness, MP3 + OGG) for existing audio."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from tydust_gen.base.errors import EXIT_TRACK_FAILED
from tydust_gen.base.settings import MAX_DURATION_S
from tydust_gen.cli.main import app
from tydust_gen.cli.output import Reporter, guarded, print_json, take_details
from tydust_gen.runs import provenance
from tydust_gen.runs.mastering import MasterBatch, MasterRequest, master_files

FLOAT = "FLOAT"
INTEGER = "INTEGER"


@app.command("master")
def master_cmd(
    files: List[Path] = typer.Argument(..., metavar="FILE...", show_default=False, help="Audio files ffmpeg reads (WAV, FLAC, MP3, OGG...)."),
    out_dir: Optional[Path] = typer.Option(
        None, "--out-dir", "-o", metavar="PATH", help="Output folder for NAME.mp3, NAME.ogg, NAME.json (default assets/music/)."
    ),
    duration: Optional[str] = typer.Option(
        None, "--duration", "-d", metavar=FLOAT,
        help=f"Seconds to keep from the start (default: the whole file; max {MAX_DURATION_S:g}); with --loop, the length the loop aims at.",
    ),  # fmt: skip
    loudness: Optional[str] = typer.Option(
        None, "--loudness", metavar="FLOAT|off", help="Integrated loudness target in LUFS, or 'off' (default -14). Peaks still respect --true-peak."
    ),
    true_peak: Optional[str] = typer.Option(
        None, "--true-peak", metavar=FLOAT, help="True-peak ceiling in dBTP, checked on the decoded MP3 and OGG (default -1.0)."
    ),
    fade_in: Optional[str] = typer.Option(None, "--fade-in", metavar=FLOAT, help="Equal-power fade-in, seconds (default 0)."),
    fade_out: Optional[str] = typer.Option(None, "--fade-out", metavar=FLOAT, help="Equal-power fade-out, seconds (default 0)."),
    loop: bool = typer.Option(
        False, "--loop",
        help="Seamless loop cut on the downbeat: the most whole bars that fit (or the bars nearest --duration); "
        "by length when the music has no clear beat. LOOPSTART/LOOPLENGTH tags in the OGG. No fades.",
    ),  # fmt: skip
    bars: Optional[str] = typer.Option(None, "--bars", metavar=INTEGER, help="With --loop: exactly this many bars."),
    meter: Optional[str] = typer.Option(None, "--meter", metavar="N/D", help="Time signature the bars are counted in (default 4/4)."),
    bpm: Optional[str] = typer.Option(
        None, "--bpm", metavar=FLOAT, help="The music's tempo if you know it: centres the tempo detection and sets the BPM tag."
    ),
    preview: bool = typer.Option(False, "--preview", help="Also write NAME.png: waveform and spectrogram (needs matplotlib)."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace existing outputs (default: refuse)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No warnings or summary; errors only."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable result on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    """Master existing audio files like generated tracks: NAME.ext → NAME.mp3 + NAME.ogg + NAME.json."""
    rep = Reporter(quiet)
    request = MasterRequest(
        files=list(files),
        cli_settings={
            "duration": duration,
            "loudness": loudness,
            "true_peak": true_peak,
            "fade_in": fade_in,
            "fade_out": fade_out,
            "loop": True if loop else None,
            "bars": bars,
            "meter": meter,
            "preview": True if preview else None,
            "bpm": bpm,
        },
        out_dir=out_dir,
        force=force,
    )

    def body() -> int:
        done = master_files(request, rep)
        if as_json:
            print_json({"ok": not done.failed, "total_s": round(done.total_s, 3), "tracks": master_json(done)})
        _summary(rep, done)
        return EXIT_TRACK_FAILED if done.failed else 0

    guarded(rep, debug, body, as_json=as_json)


def master_json(done: MasterBatch) -> list[dict]:
    """One object per input file, as ``--json`` prints it."""
    out = []
    for plan, r in zip(done.plans, done.results):
        out.append({
            "file": str(plan.source.path),
            "track": r.name,
            "ok": r.ok,
            "error": r.error,
            "source": {"sample_rate": plan.source.sample_rate, "duration_s": round(plan.source.duration_s, 6),
                       "sha256": plan.source.sha256},
            "files": [{**provenance.to_jsonable(f), "duration_s": round(f.duration_s, 4)} for f in r.files],
            "loudness": r.loudness,
            "loop": r.loop,
            "preview": str(r.preview) if r.preview else None,
            "provenance": str(provenance.record_path(plan.out_dir, r.name)) if r.ok else None,
            "timings_s": {k: round(v, 3) for k, v in r.timings.items()},
        })  # fmt: skip
    return out


def _summary(rep: Reporter, done: MasterBatch) -> None:
    for plan, r in zip(done.plans, done.results):
        if not r.ok:
            continue
        rep.info(f"{r.name}: from {plan.source.path} ({plan.source.duration_s:.2f} s at {plan.source.sample_rate} Hz), {r.timings['total']:.1f} s")
        take_details(rep, r)
    ok = sum(r.ok for r in done.results)
    rep.info(f"done: {ok}/{len(done.results)} file(s) in {done.total_s:.1f} s")
