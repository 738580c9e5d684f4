"""Peak memory (RSS) of EnCodec decoding and of a whole run, full-size random musicgen-small, CPU.

Not a test: run by hand, e.g.

    PYTHONPATH=src python bench/memory_bench.py                      # decode 90 s and 600 s, one 15 s run
    PYTHONPATH=src python bench/memory_bench.py --decode 90 --one-shot 90 --run 0
    PYTHONPATH=src python bench/memory_bench.py --compare 20         # chunked vs one call: error figures

Every measurement runs in its own child process (this script again, with
``--child``) so one measurement's memory cannot inflate the next. The parent
waits for each child with ``os.wait4`` and reads that child's peak resident set
(``ru_maxrss``, what ``getrusage(RUSAGE_CHILDREN)`` reports summed up as a
maximum over all children); the child also reports its RSS before the measured
stage, so the stage's own growth shows.

Children:

* ``decode S``: builds the full-size random model (``bench/musicgen_small_config.json``
  through ``bench/bench.py``, EnCodec codebooks randomised so codes decode to
  different audio), makes S seconds of random codes and decodes them with
  ``decode_codes`` (chunked, the shipped code).
* ``one-shot S``: the same, decoded in one EnCodec call (the code before chunking).
* ``compare S``: both decodes in one process; max abs error and SNR of chunked vs one call.
* ``post S``: the stages after decoding on S s of synthetic 32 kHz audio, through the
  pipeline's own functions (DC removal, 44.1 kHz stereo, mastering checked on the
  encoded files, MP3 + OGG, publish); no model loaded.
* ``after-generation S``: the full-size model loaded, S s of random codes decoded as the pipeline
  does, then the stages after decoding, in one process: a whole run without the token loop, whose
  peak does not grow with the track (each window frees its cache), so a long track's whole-run
  peak is the larger of this and a short ``run``.
* ``run S``: the whole pipeline on the full-size random model, default backend,
  one track of S seconds (``render_takes``, as the CLI runs it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SEED = 1234


def rss_mb() -> float:
    """Current resident set, MB (from /proc; 0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def peak_rss_self_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _full_size():
    import torch

    sys.path.insert(0, str(HERE))
    from bench import build_full_size  # bench/bench.py

    loaded = build_full_size(torch.device("cpu"), torch.float32)
    # transformers leaves EnCodec's codebooks at zero (FACTS.md): every code would decode alike.
    with torch.no_grad():
        for layer in loaded.model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_(0.0, 1.0)
    return loaded


def _random_codes(loaded, seconds: float):
    import torch

    frames = math.ceil(seconds * loaded.frame_rate)
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(0, loaded.codebook_size, (1, loaded.num_codebooks, frames), generator=g)


def child_decode(seconds: float, one_shot: bool) -> dict:
    import torch

    from tydust_gen.model.generate import decode_codes

    loaded = _full_size()
    codes = _random_codes(loaded, seconds)
    before = rss_mb()
    t, cpu = time.perf_counter(), time.process_time()
    if one_shot:
        with torch.inference_mode():
            audio = loaded.model.audio_encoder.decode(codes[None], audio_scales=[None]).audio_values
        samples = int(audio.shape[-1])
    else:
        samples = decode_codes(loaded, codes)[0].num_samples
    return {"rss_before_mb": before, "decode_s": time.perf_counter() - t, "decode_cpu_s": time.process_time() - cpu,
            "samples": samples}  # fmt: skip


def child_compare(seconds: float) -> dict:
    import torch

    from tydust_gen.model.generate import decode_codes

    loaded = _full_size()
    codes = _random_codes(loaded, seconds)
    t, cpu = time.perf_counter(), time.process_time()
    chunked = decode_codes(loaded, codes)[0].samples
    t_chunked, cpu_chunked = time.perf_counter() - t, time.process_time() - cpu
    t, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        ref = loaded.model.audio_encoder.decode(codes[None], audio_scales=[None]).audio_values[0, :, : chunked.shape[-1]]
    t_one, cpu_one = time.perf_counter() - t, time.process_time() - cpu
    err = (chunked - ref).double()
    return {
        "max_abs_err": float(err.abs().max()),
        "snr_db": float(10 * torch.log10((ref.double() ** 2).sum() / (err**2).sum().clamp_min(1e-300))),
        "ref_rms": float(ref.double().pow(2).mean().sqrt()),
        "chunked_s": t_chunked,
        "one_shot_s": t_one,
        "chunked_cpu_s": cpu_chunked,
        "one_shot_cpu_s": cpu_one,
    }


def _post(wave, seconds: float) -> None:
    """``prepare_take_audio`` (DC removal at 32 kHz, 44.1 kHz stereo), then ``master_take`` (mastering checked
    on the encoded files, MP3 + OGG, the OGG measured as it is encoded), then publish: as the pipeline runs them."""
    import numpy as np
    import torch

    from tydust_gen.base.settings import MasteringSettings
    from tydust_gen.base.waveform import Waveform
    from tydust_gen.export import staging as export
    from tydust_gen.export.ffmpeg import find_ffmpeg
    from tydust_gen.export.loudness import EncodedPeaks
    from tydust_gen.export.tags import TrackTags
    from tydust_gen.runs.pipeline import master_take, prepare_take_audio

    ffmpeg, mastering = find_ffmpeg(), MasteringSettings()
    take = prepare_take_audio(wave, generated_s=seconds, duration_s=seconds, mastering=mastering)
    with tempfile.TemporaryDirectory() as tmp, export.Staging(Path(tmp), "bench", ffmpeg=ffmpeg) as staging:
        tags = TrackTags(title="bench", genre=None, comment="bench")

        def encode(result):
            samples = torch.from_numpy(np.ascontiguousarray(result.samples))
            peaks = EncodedPeaks(circular=False)
            return staging.encode(Waveform(samples, 44_100), tags, then=peaks.measure, watch=peaks.watch)

        master_take(take, mastering, encode)
        staging.publish(seconds)


def child_post(seconds: float) -> dict:
    """The stages after decoding (:func:`_post`) on synthetic 32 kHz music; no model loaded."""
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    from synth import music

    from tydust_gen.base.waveform import Waveform

    wave = Waveform(torch.from_numpy(music(seconds, sr=32_000, seed=1, dc=0.3, level=0.3)[:1].copy()), 32_000)
    before = rss_mb()
    t, cpu = time.perf_counter(), time.process_time()
    _post(wave, seconds)
    return {"rss_before_mb": before, "post_s": time.perf_counter() - t, "post_cpu_s": time.process_time() - cpu}


def child_after_generation(seconds: float) -> dict:
    """A whole run without the token loop: the full-size model loaded, S seconds of random codes decoded as the
    pipeline decodes them, then the stages after decoding (:func:`_post`) with the model still loaded.
    The token loop's own peak does not grow with the track (each window's cache is freed before the next;
    measured with ``run``), so this and a short ``run`` give a long track's whole-run peak."""
    from tydust_gen.model.generate import decode_codes

    loaded = _full_size()
    codes = _random_codes(loaded, seconds)
    before = rss_mb()
    t, cpu = time.perf_counter(), time.process_time()
    wave = decode_codes(loaded, codes)[0]
    decoded_s = time.perf_counter() - t
    _post(wave, seconds)
    return {"rss_before_mb": before, "decode_s": decoded_s, "decode_and_post_s": time.perf_counter() - t,
            "cpu_s": time.process_time() - cpu}  # fmt: skip


def child_run(seconds: float) -> dict:
    import shutil

    from tydust_gen.base.settings import DEFAULT_BACKEND
    from tydust_gen.export.ffmpeg import find_ffmpeg
    from tydust_gen.model.backends import make_backend
    from tydust_gen.runs.pipeline import plan_track, render_takes

    loaded = _full_size()
    before = rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copytree(REPO / "prompts", tmp / "prompts")
        plan = plan_track(
            "phase4_peak", cli_settings={"duration": seconds, "seed": SEED}, prompts_dir=tmp / "prompts",
            out_dir=tmp / "out", overwrite=False,
        )  # fmt: skip
        t, cpu = time.perf_counter(), time.process_time()
        result = render_takes(loaded, plan, ffmpeg=find_ffmpeg(), backend=make_backend(DEFAULT_BACKEND))[0]
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
    return {"rss_before_mb": before, "backend": DEFAULT_BACKEND, "wall_s": wall, "cpu_s": cpu,
            "timings_s": {k: round(v, 2) for k, v in result.timings.items()}}  # fmt: skip


CHILDREN = {
    "decode": lambda s: child_decode(s, one_shot=False),
    "one-shot": lambda s: child_decode(s, one_shot=True),
    "compare": child_compare,
    "post": child_post,
    "after-generation": child_after_generation,
    "run": child_run,
}


def measure(kind: str, seconds: float, threads: int | None) -> dict:
    """Run one child; its report plus its own peak RSS (``ru_maxrss`` from ``wait4``)."""
    cmd = [sys.executable, __file__, "--child", kind, str(seconds)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"child {kind} {seconds} failed with {proc.returncode}")
    report = json.loads(out.strip().splitlines()[-1])
    return {"kind": kind, "seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024.0, "child_wall_s": wall, **report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decode", default="90,600", help="seconds of random codes to decode (chunked), comma separated")
    ap.add_argument("--one-shot", default="", help="seconds to decode in one EnCodec call (the code before chunking)")
    ap.add_argument("--compare", default="", help="seconds: chunked vs one call, max abs error and SNR")
    ap.add_argument("--post", default="", help="seconds of synthetic audio through the stages after decoding")
    ap.add_argument("--after-generation", default="", help="seconds: model loaded, random codes decoded, then every stage after")
    ap.add_argument("--run", default="15", help="seconds of one whole run (0: none)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the children")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "SECONDS"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        report = CHILDREN[args.child[0]](float(args.child[1]))
        report["peak_rss_self_mb"] = peak_rss_self_mb()
        print(json.dumps(report), flush=True)
        return

    def seconds(text: str) -> list[float]:
        return [float(s) for s in text.split(",") if s.strip() and float(s) > 0]

    plan = [("decode", s) for s in seconds(args.decode)] + [("one-shot", s) for s in seconds(args.one_shot)]
    plan += [("compare", s) for s in seconds(args.compare)] + [("post", s) for s in seconds(args.post)]
    plan += [("after-generation", s) for s in seconds(args.after_generation)] + [("run", s) for s in seconds(args.run)]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"full-size random musicgen-small, CPU, fp32", flush=True)  # fmt: skip
    rows = []
    for kind, s in plan:
        row = measure(kind, s, args.threads)
        rows.append(row)
        extra = {k: v for k, v in row.items() if k not in ("kind", "seconds", "peak_rss_mb")}
        print(f"  {kind:9s} {s:6g} s  peak RSS {row['peak_rss_mb'] / 1024:6.2f} GiB ({row['peak_rss_mb'] * 1024**2 / 1e9:.2f} GB)   {json.dumps(extra)}", flush=True)
    children_max = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    print(f"largest peak RSS of any child (RUSAGE_CHILDREN): {children_max / 1024:.2f} GiB ({children_max * 1024**2 / 1e9:.2f} GB)")
    print(json.dumps({"runs": rows}))


if __name__ == "__main__":
    main()
