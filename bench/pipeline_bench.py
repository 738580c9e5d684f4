"""Wall time of the stages after generation, side by side: this code, an earlier commit, and plain ffmpeg.

Not a test: run by hand, e.g.

    python bench/pipeline_bench.py --duration 90 --repeats 5
    python bench/pipeline_bench.py --duration 90 --repeats 5 --baseline main
    python bench/pipeline_bench.py --synthetic --duration 90 --repeats 3   # no model, no CLI: quick

It saves the tiny random MusicGen to a temporary folder and, ``--repeats``
times, in an order that rotates each round:

* runs ``tydust-gen TRACK --json`` on the shipped ``phase4_peak`` prompt with
  this working tree's code (``src/``), in a subprocess;
* runs the same command with the code of ``--baseline`` (a git revision,
  extracted with ``git archive``; default: the commit before the post-generation
  work of issue 11), in a subprocess;
* encodes the same audio (the mastered track, decoded once to a 16-bit WAV
  before timing) with plain ffmpeg to MP3 192k and then OGG q6, one after the
  other: the reference the stages after generation are held to.

It prints the median of each stage the JSON result reports (generate, decode,
audio, master_export), the post-generation total ``audio + master_export``
(44.1 kHz stereo, DC removal, mastering checked on the decoded files, MP3 + OGG,
tags, verification, record) and its ratio to the ffmpeg reference. The tiny
model's decoder is ~60 k parameters, so "generate" here is loop overhead; the
stages after generation do the same work for any model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

# main before issue 11's post-generation work: one-call EnCodec decode, MP3 then OGG, files measured one by one.
DEFAULT_BASELINE = "1e6ae4c"
STAGES = ["generate", "decode", "audio", "master_export"]


def extract(rev: str, dest: Path) -> Path:
    """The ``src/`` tree of git revision ``rev`` under ``dest``; returns the folder to put on PYTHONPATH."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], capture_output=True, check=True).stdout
    tar = dest / "src.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(dest, filter="data")
    return dest / "src"


def run_cli(src: Path, workdir: Path, model: Path, args: argparse.Namespace, seed: int, out: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "TYDUST_KERNEL_CACHE": str(workdir / "kernels")}
    cmd = [sys.executable, "-m", "tydust_gen", args.track, "-d", str(args.duration), "--model", str(model),
           "--seed", str(seed), "--json", "-q", "-o", out, "--backend", args.backend]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{src}: exit {proc.returncode}\n{proc.stderr}")
    timings = json.loads(proc.stdout)["tracks"][0]["timings_s"]
    return {**timings, "post": timings["audio"] + timings["master_export"], "wall": wall}


def plain_ffmpeg(ffmpeg: str, wav: Path, out: Path) -> dict:
    """MP3 192k CBR, then OGG q6, of ``wav``, one after the other, as a user would with ffmpeg alone."""
    times = {}
    for fmt, codec in (("mp3", ["-c:a", "libmp3lame", "-b:a", "192k"]), ("ogg", ["-c:a", "libvorbis", "-q:a", "6"])):
        t = time.perf_counter()
        subprocess.run([ffmpeg, "-nostdin", "-y", "-v", "error", "-i", str(wav), *codec, str(out / f"ref.{fmt}")], check=True)
        times[fmt] = time.perf_counter() - t
    return {**times, "post": times["mp3"] + times["ogg"]}


def synthetic_post(seconds: float, tmp: Path, i: int) -> tuple[dict, Path]:
    """This code's stages after the model, in-process, on synthetic 32 kHz mono music (no model, no generation),
    through the pipeline's own functions: ``prepare_take_audio`` (44.1 kHz stereo, DC removal), ``master_take``
    (mastering checked on the decoded files, MP3 + OGG at once, each measured as it is written, tags), then
    verify and publish. Returns the time and the published OGG (the same audio plain ffmpeg then encodes)."""
    import functools

    import numpy as np
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from synth import music

    from tydust_gen.base.settings import MasteringSettings
    from tydust_gen.base.waveform import Waveform
    from tydust_gen.export import staging as export
    from tydust_gen.export.ffmpeg import find_ffmpeg
    from tydust_gen.export.loudness import measure_file
    from tydust_gen.export.tags import TrackTags
    from tydust_gen.runs.pipeline import master_take, prepare_take_audio

    wave = Waveform(torch.from_numpy(music(seconds + 0.5, sr=32_000, seed=i, dc=0.3, level=0.3)[:1].copy()), 32_000)
    ffmpeg, out, mastering = find_ffmpeg(), tmp / f"synthetic-{i}", MasteringSettings()
    t = time.perf_counter()
    take = prepare_take_audio(wave, generated_s=seconds, duration_s=seconds, mastering=mastering)
    t_audio = time.perf_counter() - t
    with export.Staging(out, "bench", ffmpeg=ffmpeg) as staging:
        tags = TrackTags(title="bench", genre=None, comment="bench")

        def encode(result):
            wave = Waveform(torch.from_numpy(np.ascontiguousarray(result.samples)), 44_100)
            return staging.encode(wave, tags, then=functools.partial(measure_file, circular=False))

        master_take(take, mastering, encode)
        staging.publish(seconds)
    post = time.perf_counter() - t
    return {"audio": t_audio, "master_export": post - t_audio, "post": post}, out / "bench.ogg"


def synthetic_main(args: argparse.Namespace, ffmpeg: str) -> None:
    """``--synthetic``: this code's stages after the model against plain ffmpeg, alternating, ``--repeats`` rounds."""
    rows: dict[str, list[dict]] = {"ffmpeg": [], "this": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic_post(1.0, tmp, 999)  # warm-up: imports, page cache
        wav = None
        for i in range(args.repeats):
            if i % 2 and wav is not None:  # the order alternates: ffmpeg first (on the last round's audio)
                rows["ffmpeg"].append(plain_ffmpeg(ffmpeg, wav, tmp))
                row, ogg = synthetic_post(args.duration, tmp, i)
                rows["this"].append(row)
            else:
                row, ogg = synthetic_post(args.duration, tmp, i)
                rows["this"].append(row)
            wav = tmp / f"ref-{i}.wav"
            subprocess.run([ffmpeg, "-nostdin", "-v", "error", "-i", str(ogg), "-c:a", "pcm_s16le", str(wav)], check=True)
            if len(rows["ffmpeg"]) < len(rows["this"]):
                rows["ffmpeg"].append(plain_ffmpeg(ffmpeg, wav, tmp))
            print(f"round {i + 1}: this {rows['this'][-1]['post']:.2f} s, ffmpeg {rows['ffmpeg'][-1]['post']:.2f} s, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    ref, post = median(rows["ffmpeg"], "post"), median(rows["this"], "post")
    per_round = statistics.median(r["post"] / f["post"] for r, f in zip(rows["this"], rows["ffmpeg"]))
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the end; synthetic {args.duration:g} s, {args.repeats} rounds (medians, seconds)")
    print(f"  plain ffmpeg, MP3 then OGG   {ref:6.2f}   (MP3 {median(rows['ffmpeg'], 'mp3'):.2f}, OGG {median(rows['ffmpeg'], 'ogg'):.2f})")
    print(f"  stages after the model       {post:6.2f}   ({post / ref:.2f}x ffmpeg; per round {per_round:.2f}x)   "
          f"[audio {median(rows['this'], 'audio'):.2f}; master_export {median(rows['this'], 'master_export'):.2f}]")
    print(json.dumps({"duration_s": args.duration, "synthetic": True, "rows": rows}))


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of music")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--track", default="phase4_peak")
    ap.add_argument("--backend", default="fast", help="fast, fast-int8 or stock")
    ap.add_argument("--baseline", default=DEFAULT_BASELINE, help="git revision to compare with ('' for none)")
    ap.add_argument("--synthetic", action="store_true",
                    help="no model and no CLI: this code's stages after the model on synthetic audio vs plain ffmpeg")
    args = ap.parse_args()

    from tydust_gen.export.ffmpeg import find_ffmpeg
    from tydust_gen.model.tiny import save_tiny_model

    ffmpeg = find_ffmpeg().path
    if args.synthetic:
        return synthetic_main(args, ffmpeg)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_tiny_model(tmp / "tiny")
        shutil.copytree(REPO / "prompts", tmp / "prompts")
        codes = {"this": REPO / "src"}
        if args.baseline:
            (tmp / "baseline").mkdir()
            codes["baseline"] = extract(args.baseline, tmp / "baseline")
        # Warm-up, untimed: builds the CPU kernel once and loads every library into the page cache.
        for name, src in codes.items():
            run_cli(src, tmp, model, argparse.Namespace(**{**vars(args), "duration": 1.0}), 0, f"warm-{name}")
        run_cli(codes["this"], tmp, model, args, 0, "reference")
        wav = tmp / "reference.wav"
        subprocess.run([ffmpeg, "-nostdin", "-v", "error", "-i", str(tmp / "reference" / f"{args.track}.ogg"),
                        "-c:a", "pcm_s16le", str(wav)], check=True)  # fmt: skip

        rows: dict[str, list[dict]] = {"ffmpeg": [], **{name: [] for name in codes}}
        order = ["ffmpeg", *codes]
        for i in range(args.repeats):
            for name in order[i % len(order) :] + order[: i % len(order)]:
                if name == "ffmpeg":
                    rows[name].append(plain_ffmpeg(ffmpeg, wav, tmp))
                else:
                    rows[name].append(run_cli(codes[name], tmp, model, args, i + 1, f"out-{name}-{i}"))
            print(f"round {i + 1}: " + ", ".join(f"{n} {rows[n][-1]['post']:.2f} s" for n in order), flush=True)

    ref = median(rows["ffmpeg"], "post")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} at the end; "
          f"tiny model, backend {args.backend}, {args.duration:g} s, {args.repeats} rounds (medians, seconds)")  # fmt: skip
    print(f"  plain ffmpeg, MP3 then OGG      {ref:6.2f}   (MP3 {median(rows['ffmpeg'], 'mp3'):.2f}, OGG {median(rows['ffmpeg'], 'ogg'):.2f})")
    for name in codes:
        label = "this code" if name == "this" else f"baseline {args.baseline}"
        parts = ", ".join(f"{k} {median(rows[name], k):.2f}" for k in STAGES)
        post = median(rows[name], "post")
        # the same round's ffmpeg time: on a shared machine the load moves between rounds
        per_round = statistics.median(r["post"] / f["post"] for r, f in zip(rows[name], rows["ffmpeg"]))
        print(f"  {label:30s}  {post:6.2f}   ({post / ref:.2f}x ffmpeg; per round {per_round:.2f}x)   "
              f"[{parts}; command {median(rows[name], 'wall'):.2f}]")  # fmt: skip
    print(json.dumps({"duration_s": args.duration, "baseline": args.baseline, "rows": rows}))


if __name__ == "__main__":
    main()
