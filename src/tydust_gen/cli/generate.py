"""``tydust-gen generate TRACK...`` (the default command): parse the options, run the batch, report."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Iterator, List, Optional

import typer

from tydust_gen.base.errors import EXIT_TRACK_FAILED
from tydust_gen.base.settings import MAX_DURATION_S
from tydust_gen.cli.main import DEFAULT_COMMAND, app
from tydust_gen.cli.output import Reporter, guarded, print_json, summary, summary_table
from tydust_gen.model.loading import DEFAULT_MODEL
from tydust_gen.runs.batch import BatchRequest, WorkerBoard, run_batch, track_json
from tydust_gen.runs.distributed import RayScaleOut, scale_request

# Numbers arrive as text and are parsed by the core (tydust_gen.base.settings), so a bad value gets the
# same one-line message from the command line and from a prompt file; the metavars show the type in --help.
FLOAT = "FLOAT"
INTEGER = "INTEGER"


@app.command(DEFAULT_COMMAND)
def generate_cmd(
    tracks: Optional[List[str]] = typer.Argument(None, metavar="TRACK...", help="Track names: prompts/TRACK.toml or prompts/TRACK.txt."),
    all_tracks: bool = typer.Option(False, "--all", help="Every prompt file in the prompts folder."),
    skip_existing: bool = typer.Option(
        False, "--skip-existing", help="Skip tracks whose outputs are complete and match their provenance record (prompt, settings, model)."
    ),
    duration: Optional[str] = typer.Option(
        None, "--duration", "-d", metavar=FLOAT, help=f"Seconds of music (default: prompt file, else 30; max {MAX_DURATION_S:g})."
    ),
    seed: Optional[str] = typer.Option(
        None, "--seed", metavar=INTEGER, help="Seed for a reproducible take on the same device (default: random, reported)."
    ),
    temperature: Optional[str] = typer.Option(None, "--temperature", metavar=FLOAT, help="Sampling temperature, > 0 (default 1.0)."),
    top_k: Optional[str] = typer.Option(
        None, "--top-k", metavar=INTEGER, help="Sample among the k likeliest tokens; 0 = off (default 250)."
    ),
    top_p: Optional[str] = typer.Option(
        None, "--top-p", metavar=FLOAT, help="Nucleus sampling when > 0; 0.0 means OFF, not greedy (default 0.0). When > 0 it replaces top-k."
    ),
    guidance: Optional[str] = typer.Option(
        None, "--guidance", metavar=FLOAT, help="Classifier-free guidance scale; <= 1 turns it off (default 3.0)."
    ),
    greedy: bool = typer.Option(False, "--greedy", help="Always take the likeliest token instead of sampling."),
    window: Optional[str] = typer.Option(
        None, "--window", metavar=FLOAT, help="Seconds generated per pass (default 30, the model's training span)."
    ),
    stride: Optional[str] = typer.Option(
        None, "--stride", metavar=FLOAT, help="Seconds each further pass advances; the rest of the window is re-fed as context (default 18)."
    ),
    backend: Optional[str] = typer.Option(
        None,
        "--backend",
        metavar="TEXT",
        help="Decode loop: fast (default; same tokens as stock), fast-int8 (CPU, ~3x faster, small quality cost) or stock (transformers' generate).",
    ),
    model: str = typer.Option(
        DEFAULT_MODEL, "--model", envvar="TYDUST_MODEL", metavar="TEXT", help="Hub id (uses the HF cache; honours HF_HUB_OFFLINE) or a local snapshot folder."
    ),
    device: str = typer.Option("auto", "--device", metavar="TEXT", help="auto (CUDA when present), cuda, cuda:N or cpu."),
    dtype: str = typer.Option(
        "auto", "--dtype", metavar="TEXT",
        help="Decoder precision: auto (bf16 on a GPU that has it, else fp16 on CUDA; fp32 on the CPU), fp16, bf16 or fp32. "
        "T5 and EnCodec always run in fp32.",
    ),  # fmt: skip
    workers: Optional[str] = typer.Option(
        None, "--workers", metavar=INTEGER,
        help="Render on N worker processes, each holding the model (Ray actors; CPU workers share the cores). "
        "Alone: a Ray started on this machine for the run; with --ray: N workers on the cluster. Needs tydust-gen[ray].",
    ),  # fmt: skip
    devices: Optional[str] = typer.Option(
        None, "--devices", metavar="LIST",
        help="One worker per device of this machine, e.g. cuda:0,cuda:1 (cpu for a CPU worker). Needs tydust-gen[ray].",
    ),  # fmt: skip
    ray: Optional[str] = typer.Option(
        None, "--ray", metavar="ADDRESS",
        help="Render on a Ray cluster: auto (the running one, see `ray start --head`), local (start one here) "
        "or HOST:PORT. One worker per GPU, else see --workers. Needs tydust-gen[ray].",
    ),  # fmt: skip
    prompts_dir: Path = typer.Option(Path("prompts"), "--prompts-dir", envvar="TYDUST_PROMPTS_DIR", metavar="PATH", help="Folder of prompt files."),
    out_dir: Optional[Path] = typer.Option(
        None, "--out-dir", "-o", metavar="PATH", help="Output folder (default assets/music/<genre>/ when the prompt file names one, else assets/music/)."
    ),
    loudness: Optional[str] = typer.Option(
        None, "--loudness", metavar="FLOAT|off", help="Integrated loudness target in LUFS, or 'off' (default -14). Peaks still respect --true-peak."
    ),
    true_peak: Optional[str] = typer.Option(
        None, "--true-peak", metavar=FLOAT, help="True-peak ceiling in dBTP, checked on the decoded MP3 and OGG (default -1.0)."
    ),
    fade_in: Optional[str] = typer.Option(None, "--fade-in", metavar=FLOAT, help="Equal-power fade-in, seconds (default 0)."),
    fade_out: Optional[str] = typer.Option(None, "--fade-out", metavar=FLOAT, help="Equal-power fade-out, seconds (default 0)."),
    loop: bool = typer.Option(
        False, "--loop", help="Seamless loop, the whole bars nearest --duration cut on the downbeat (exactly --duration when the music has no clear beat); LOOPSTART/LOOPLENGTH tags in the OGG. No fades."
    ),
    bars: Optional[str] = typer.Option(None, "--bars", metavar=INTEGER, help="With --loop: exactly this many bars (tempo detected; the prompt file's bpm helps)."),
    meter: Optional[str] = typer.Option(None, "--meter", metavar="N/D", help="Time signature the bars are counted in (default: prompt file, else 4/4)."),
    variations: Optional[str] = typer.Option(
        None, "--variations", "-n", metavar=INTEGER, help="Takes generated in one batch, written as TRACK_v1, TRACK_v2... (default 1)."
    ),
    continue_from: Optional[Path] = typer.Option(
        None, "--continue-from", metavar="FILE",
        help="Continue this audio: its last --context seconds prompt the first window; the output holds only the new music.",
    ),  # fmt: skip
    context: Optional[str] = typer.Option(
        None, "--context", metavar=FLOAT, help="Seconds of --continue-from (or the prompt file's continue_from) fed to the model (default 10, max 20)."
    ),
    melody: Optional[Path] = typer.Option(
        None, "--melody", metavar="FILE",
        help="Follow this tune (any audio ffmpeg reads, up to 10 minutes) with a melody model "
        "(--model facebook/musicgen-melody or -melody-large); it loops when shorter than the track.",
    ),  # fmt: skip
    preview: bool = typer.Option(False, "--preview", help="Also write TRACK.png: waveform and spectrogram (needs matplotlib)."),
    force: bool = typer.Option(False, "--force", "-f", help="Replace existing outputs (default: refuse)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress, warnings or summary; errors only."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable result on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    """Generate tracks from their prompt files (the default command)."""
    rep = _BatchReporter(quiet)
    request = BatchRequest(
        tracks=tracks,
        cli_settings={
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
            "bars": bars,
            "meter": meter,
            "variations": variations,
            "preview": True if preview else None,
            "continue_from": str(continue_from) if continue_from is not None else None,
            "context": context,
            "melody": str(melody) if melody is not None else None,
        },
        model_ref=model,
        device_name=device,
        dtype_name=dtype,
        prompts_dir=prompts_dir,
        out_dir=out_dir,
        force=force,
        all_tracks=all_tracks,
        skip_existing=skip_existing,
    )

    def body() -> int:
        scale = scale_request(ray=ray, workers=workers, devices=devices, device_name=device, worker_logs=debug)
        # Ray prints from threads of its own on stdout (a worker that died; with --debug, what workers print):
        # stdout is for --json, so during the run its lines go to stderr with the rest of the human output.
        with contextlib.redirect_stdout(sys.stderr) if scale else contextlib.nullcontext():
            done = run_batch(request, rep, scale=RayScaleOut(scale, model) if scale else None)
        if as_json:
            print_json({
                "ok": not done.failed,
                "model": model,
                "device": done.device,
                "dtype": done.dtype,
                "load_s": round(done.load_s, 3),
                "total_s": round(done.total_s, 3),
                "tracks": [track_json(r, done.statuses[r.name]) for r in done.results],
            })  # fmt: skip
        summary(rep, done.results, done.total_s)
        summary_table(rep, done.results, done.statuses)
        return EXIT_TRACK_FAILED if done.failed else 0

    guarded(rep, debug, body, as_json=as_json)


class _BatchReporter(Reporter):
    """The reporter, plus one progress line per worker and one for the batch when workers render."""

    @contextlib.contextmanager
    def workers(self, labels: list[str], tracks: int) -> Iterator[WorkerBoard]:
        if not self.interactive:
            yield WorkerBoard()
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        # counts as a text field: a worker between tracks has no step count, and rich cannot unset a total
        bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[count]}"), TimeElapsedColumn(),
                       console=self.console)  # fmt: skip
        with bar:
            whole = bar.add_task("batch", total=tracks, count=f"0/{tracks} tracks")
            lines = {label: bar.add_task(f"{label}: starting", total=None, count="") for label in labels}
            yield _RichBoard(bar, whole, lines)


class _RichBoard(WorkerBoard):
    def __init__(self, bar: Any, whole: Any, lines: dict[str, Any]):
        self.bar, self.whole, self.lines = bar, whole, lines

    def worker(self, label: str, text: str, done: int | None = None, total: int | None = None) -> None:
        if label not in self.lines:
            return
        count = f"{done}/{total} steps" if total else ""
        self.bar.update(self.lines[label], description=f"{label}: {text}", completed=done or 0, total=total, count=count)

    def batch(self, finished: int, total: int) -> None:
        self.bar.update(self.whole, completed=finished, total=total, count=f"{finished}/{total} tracks")
