"""Wall time of the stages after generation, side by side: this code, an earlier commit, and plain ffmpeg.

Not a test: run by hand, e.g.

    python bench/pipeline_bench.py --duration 90 --repeats 5
    python bench/pipeline_bench.py --duration 90 --repeats 5 --baseline main
    python bench/pipeline_bench.py --synthetic --duration 90 --repeats 6 --baseline 0f9b79f   # no model, no CLI

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
if "--synthetic-child" not in sys.argv:  # a child runs the code its PYTHONPATH names
    sys.path.insert(0, str(REPO / "src"))

# main before issue 11's post-generation work: one-call EnCodec decode, MP3 then OGG, files measured one by one.
DEFAULT_BASELINE = "1e6ae4c"
# (--synthetic needs prepare_take_audio and master_take, which 1e6ae4c lacks: pass e.g. --baseline 0f9b79f, main
# before this session's post-generation work.)
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
    """The stages after the model of the code on ``sys.path``, in-process, on synthetic 32 kHz mono music (no
    model, no generation), through the pipeline's own functions: ``prepare_take_audio`` (DC removal, 44.1 kHz
    stereo), ``master_take`` (mastering checked on the decoded files, MP3 + OGG at once, tags), then verify and
    publish. Code that measures each file in its encoding thread (``measure_file``) is run that way; older code
    measures after both encodes, as it did. Returns the time and the published OGG (what plain ffmpeg then
    encodes)."""
    import functools

    import numpy as np
    import torch

    sys.path.append(str(REPO / "tests"))
    from synth import music

    from tydust_gen.base.settings import MasteringSettings
    from tydust_gen.base.waveform import Waveform
    from tydust_gen.export import loudness
    from tydust_gen.export import staging as export
    from tydust_gen.export.ffmpeg import find_ffmpeg
    from tydust_gen.export.tags import TrackTags
    from tydust_gen.runs.pipeline import master_take, prepare_take_audio

    measure = getattr(loudness, "measure_file", None)
    peaks_class = getattr(loudness, "EncodedPeaks", None)  # the OGG measured while it is encoded
    wave = Waveform(torch.from_numpy(music(seconds + 0.5, sr=32_000, seed=i, dc=0.3, level=0.3)[:1].copy()), 32_000)
    ffmpeg, out, mastering = find_ffmpeg(), tmp / f"synthetic-{i}", MasteringSettings()
    t = time.perf_counter()
    take = prepare_take_audio(wave, generated_s=seconds, duration_s=seconds, mastering=mastering)
    t_audio = time.perf_counter() - t
    with export.Staging(out, "bench", ffmpeg=ffmpeg) as staging:
        tags = TrackTags(title="bench", genre=None, comment="bench")

        def encode(result):
            wave = Waveform(torch.from_numpy(np.ascontiguousarray(result.samples)), 44_100)
            if peaks_class is not None:
                peaks = peaks_class(circular=False)
                return staging.encode(wave, tags, then=peaks.measure, watch=peaks.watch)
            if measure is None:
                return staging.encode(wave, tags)
            return staging.encode(wave, tags, then=functools.partial(measure, circular=False))

        mastered = master_take(take, mastering, encode)
        staging.publish(seconds)
    post = time.perf_counter() - t
    row = {"audio": t_audio, "master_export": post - t_audio, "post": post, "encode_tries": mastered.tries}
    return row, out / "bench.ogg"


def synthetic_child(args: argparse.Namespace) -> None:
    """``--synthetic-child``: one synthetic take (after a 1 s warm-up) with the code on PYTHONPATH; prints JSON."""
    out = Path(args.synthetic_child)
    synthetic_post(1.0, out, 999)
    row, ogg = synthetic_post(args.duration, out, args.seed)
    import tydust_gen

    print(json.dumps({**row, "ogg": str(ogg), "code": str(Path(tydust_gen.__file__).parents[1])}))


def synthetic_main(args: argparse.Namespace, ffmpeg: str) -> None:
    """``--synthetic``: this code's stages after the model, the baseline's, and plain ffmpeg, in an order that
    rotates each round. Each take runs in a fresh process with that code on PYTHONPATH; the same synthetic
    music (the round's seed) for both codes; ffmpeg encodes the OGG this code published, as 16-bit WAV."""
    codes = {"this": REPO / "src"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.baseline:
            (tmp / "baseline").mkdir()
            codes["baseline"] = extract(args.baseline, tmp / "baseline")
        def take(name: str, label: str, seed: int) -> dict:
            (tmp / label).mkdir()
            cmd = [sys.executable, __file__, "--synthetic-child", str(tmp / label),
                   "--duration", str(args.duration), "--seed", str(seed)]  # fmt: skip
            proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(codes[name])}, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr}")
            return json.loads(proc.stdout.strip().splitlines()[-1])

        # ffmpeg's audio: this code's OGG of the music, as 16-bit WAV (untimed; encode time hardly depends on the music)
        wav = tmp / "reference.wav"
        subprocess.run([ffmpeg, "-nostdin", "-v", "error", "-i", take("this", "reference", 0)["ogg"],
                        "-c:a", "pcm_s16le", str(wav)], check=True)  # fmt: skip
        rows: dict[str, list[dict]] = {"ffmpeg": [], **{name: [] for name in codes}}
        order = [*codes, "ffmpeg"]
        for i in range(args.repeats):
            for name in order[i % len(order) :] + order[: i % len(order)]:
                rows[name].append(plain_ffmpeg(ffmpeg, wav, tmp) if name == "ffmpeg" else take(name, f"{name}-{i}", i + 1))
            print(f"round {i + 1}: " + ", ".join(f"{n} {rows[n][-1]['post']:.2f} s" for n in order)
                  + f", load {os.getloadavg()[0]:.1f}", flush=True)  # fmt: skip
    ref = median(rows["ffmpeg"], "post")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at the end; synthetic {args.duration:g} s, {args.repeats} rounds (medians, seconds)")
    print(f"  plain ffmpeg, MP3 then OGG   {ref:6.2f}   (MP3 {median(rows['ffmpeg'], 'mp3'):.2f}, OGG {median(rows['ffmpeg'], 'ogg'):.2f})")
    for name in codes:
        label = "this code" if name == "this" else f"baseline {args.baseline}"
        post = median(rows[name], "post")
        per_round = statistics.median(r["post"] / f["post"] for r, f in zip(rows[name], rows["ffmpeg"]))
        tries = sorted({r["encode_tries"] for r in rows[name]})
        print(f"  {label:26s} {post:6.2f}   ({post / ref:.2f}x ffmpeg; per round {per_round:.2f}x)   "
              f"[audio {median(rows[name], 'audio'):.2f}; master_export {median(rows[name], 'master_export'):.2f}; "
              f"encode tries {tries}]")  # fmt: skip
    print(json.dumps({"duration_s": args.duration, "synthetic": True, "baseline": args.baseline, "rows": rows}))


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
                    help="no model and no CLI: the stages after the model on synthetic audio, this code, the baseline and plain ffmpeg")
    ap.add_argument("--synthetic-child", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.synthetic_child:
        return synthetic_child(args)

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
