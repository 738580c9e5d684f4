"""How long the real CLI takes to exit after Ctrl-C, per pipeline stage.

Not a test: run by hand, e.g.

    PYTHONPATH=src python bench/interrupt_latency.py --reps 5                 # tiny model, 20 s track
    PYTHONPATH=src python bench/interrupt_latency.py --full /tmp/full --duration 5 --reps 3

For each stage it starts ``tydust-gen TRACK`` in its own session (as a shell job
is), lets the test hook print its marker at that stage *without pausing*
(``TYDUST_TEST_HOOK_SLEEP=0``), so the process is busy with the stage's real
work when SIGINT arrives, and measures the time from ``kill`` to the process's
exit (its memory freed, as a shell sees it) and the CPU time the process used
after the signal (which machine load hardly changes). It checks each run exited
130 and what it left, and prints the median and worst figures per stage.

``--full DIR`` uses a random-weight musicgen-small (``bench/musicgen_small_config.json``)
saved in DIR (built there on first use, about 2.4 GB); the default is the tiny test model.

``--codec-seconds S`` adds an in-process figure for a long track's EnCodec decode
(full-size EnCodec, random weights, S seconds of random codes): SIGINT sent as its
LSTM (one torch call over the whole track) starts, time until ``KeyboardInterrupt``;
``--direct`` runs the decode in the calling thread, as before the fix.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

#: stage -> test hook that marks it (see tydust_gen.base.faults)
STAGES = {
    "loading": "loading",  # from_pretrained (and the CPU kernel check)
    "generate": "generate:20",  # the decode loop, after step 20
    "decode": "decode",  # EnCodec decode of the whole track
    "master": "master",  # resample, DC, loudness and true-peak passes
    "encode": "encode",  # ffmpeg writing the OGG (the MP3 is done)
    "commit": "commit-held",  # between the final renames
}
TRACK = "game_over"
MARKER_TIMEOUT_S = 600  # s; a full-size model loads and generates before the later hooks


def save_full_size(directory: Path) -> Path:
    """Save the random musicgen-small (bench/bench.py's builder) with the tiny tokenizer, once."""
    if (directory / "config.json").is_file():
        return directory
    import torch

    sys.path.insert(0, str(REPO / "bench"))
    from bench import build_full_size

    loaded = build_full_size(torch.device("cpu"), torch.float32)
    directory.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(directory)
    loaded.processor.save_pretrained(directory)
    return directory


def one_run(work: Path, model: Path, hook: str, args: argparse.Namespace) -> dict:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    go = work / "go"
    go.unlink(missing_ok=True)
    # Between the renames the hold waits for the go file, made right after the signal, so the
    # run cannot end before it; everywhere else the hook only marks the stage.
    env = {**os.environ, "PYTHONPATH": str(args.src), "HF_HUB_OFFLINE": "1", "TYDUST_TEST_HOOK": hook,
           "TYDUST_TEST_HOOK_SLEEP": "60" if hook == "commit-held" else "0", "TYDUST_TEST_HOOK_GO": str(go)}  # fmt: skip
    cmd = [sys.executable, "-m", "tydust_gen", TRACK, "-d", str(args.duration), "--seed", "1", "-o", "out",
           "--model", str(model), "--backend", args.backend]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + MARKER_TIMEOUT_S
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line or line.startswith("tydust-test-hook:"):
            break
    cpu_before = cpu_s(proc.pid)
    started = time.perf_counter()
    os.kill(proc.pid, signal.SIGINT)
    go.touch()
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read()
    proc.stderr.close()
    left = sorted(p.name for p in out.rglob("*")) if out.exists() else []
    return {"s": took, "cpu": usage.ru_utime + usage.ru_stime - cpu_before, "rc": proc.returncode, "left": left,
            "err": err.strip().splitlines()[-1:] if err else []}  # fmt: skip


def cpu_s(pid: int) -> float:
    """CPU seconds used so far by ``pid``: its threads and reaped children (utime, stime, cutime, cstime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def codec_latency(seconds: float, reps: int, direct: bool) -> list[tuple[float, float]]:
    """(SIGINT → KeyboardInterrupt, LSTM call) seconds for a full-size EnCodec decode of ``seconds`` of codes."""
    import threading
    from types import SimpleNamespace

    import torch
    from transformers import EncodecConfig, EncodecModel

    from tydust_gen.model import generate

    raw = json.loads((REPO / "bench/musicgen_small_config.json").read_text())["audio_encoder"]
    raw.pop("model_type")
    torch.manual_seed(0)
    codec = EncodecModel(EncodecConfig(**raw)).eval()
    loaded = SimpleNamespace(model=SimpleNamespace(audio_encoder=codec), sample_rate=raw["sampling_rate"], frame_rate=50)
    codes = torch.randint(0, raw["codebook_size"], (1, 4, int(seconds * 50)))
    lstm = codec.decoder.layers[1].lstm
    marks: dict[str, float] = {}
    entered = threading.Event()
    lstm.register_forward_pre_hook(lambda m, a: (marks.__setitem__("start", time.perf_counter()), entered.set()))
    lstm.register_forward_hook(lambda m, a, o: marks.__setitem__("end", time.perf_counter()))
    decode = generate._decode_takes if direct else generate.decode_codes
    rows = []
    for _ in range(reps):
        marks.clear()
        entered.clear()

        def interrupt():
            entered.wait()
            marks["signal"] = time.perf_counter()
            os.kill(os.getpid(), signal.SIGINT)

        sender = threading.Thread(target=interrupt)
        sender.start()
        try:
            decode(loaded, codes)
        except KeyboardInterrupt:
            marks["interrupted"] = time.perf_counter()
        sender.join()
        for t in threading.enumerate():
            if t.name.startswith("tydust-"):
                t.join()
        end = marks.get("end", marks["interrupted"])
        rows.append((marks["interrupted"] - marks["signal"], end - marks["start"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of music")
    ap.add_argument("--backend", default="fast")
    ap.add_argument("--full", type=Path, help="folder for the full-size random model")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated; empty for none")
    ap.add_argument("--src", type=Path, default=REPO / "src", help="the package to run (another checkout's src/)")
    ap.add_argument("--codec-seconds", type=float, default=0.0, help="also time a long EnCodec decode in-process")
    ap.add_argument("--direct", action="store_true", help="with --codec-seconds: decode in the calling thread")
    args = ap.parse_args()
    # A shell starts a background job with SIGINT ignored and children inherit that (not a handler).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        shutil.copytree(REPO / "prompts", work / "prompts")
        if args.full:
            model = save_full_size(args.full)
        else:
            from tydust_gen.model.tiny import save_tiny_model

            model = save_tiny_model(work / "tiny")
        results: dict[str, list[dict]] = {}
        for stage in filter(None, args.stages.split(",")):
            results[stage] = [one_run(work, model, STAGES[stage], args) for _ in range(args.reps)]
    load = os.getloadavg()[0]
    if results:
        print(f"{os.cpu_count()} cores, load {load:.1f}; model {'full-size random' if args.full else 'tiny'}, "
              f"backend {args.backend}, {args.duration:g} s track, {args.reps} runs per stage")  # fmt: skip
        print("  seconds from SIGINT to exit (wall), and CPU seconds the process used after it")
    for stage, runs in results.items():
        times, cpus = [r["s"] for r in runs], [r["cpu"] for r in runs]
        rcs = sorted({r["rc"] for r in runs})
        # commit: the take is complete (the hold finishes the renames); elsewhere nothing is left
        lefts = sorted({tuple(r["left"]) for r in runs})
        print(f"  {stage:9s} wall median {statistics.median(times):6.3f} max {max(times):6.3f}   "
              f"cpu median {statistics.median(cpus):5.2f} max {max(cpus):5.2f}   exit {rcs}  left {lefts}")  # fmt: skip
    if results:
        print(json.dumps({k: [[round(r["s"], 3), round(r["cpu"], 2)] for r in v] for k, v in results.items()}))
    if args.codec_seconds:
        rows = codec_latency(args.codec_seconds, args.reps, args.direct)
        how = "in the calling thread (before the fix)" if args.direct else "through decode_codes"
        print(f"EnCodec decode of {args.codec_seconds:g} s, full-size, {how}: SIGINT as the LSTM starts")
        print(f"  to KeyboardInterrupt median {statistics.median(r[0] for r in rows):.3f} s, max {max(r[0] for r in rows):.3f} s;"
              f" the LSTM call took median {statistics.median(r[1] for r in rows):.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
