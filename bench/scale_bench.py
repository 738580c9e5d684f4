"""Wall time of one 8-track batch in one process, on 1 Ray worker and on 2, side by side; bytes per take.

Not a test: run by hand, e.g.

    python bench/scale_bench.py --duration 30 --out bench/results/scale_cpu.json

It saves the tiny random MusicGen to a temporary folder, writes 8 prompt files
(the 4 shipped ones, twice), and runs the real command as a fresh process for
each configuration, so every wall time includes starting Python, importing
torch and (with workers) starting Ray and the workers:

* ``single``: ``tydust-gen --all`` (today's path: one process, one model);
* ``workers=1``: ``--workers 1`` (a private Ray, one worker with every core);
* ``workers=2``: ``--workers 2`` (two workers, each with half the cores).

Same seed everywhere. The tiny model's decoder is tiny, so a track costs
mostly the per-step Python loop, EnCodec decode, mastering and encoding: the
figures say what Ray's startup and the split cost on this machine, not what
a GPU would gain (docs/SCALING.md has the paper estimate for that).

``--transfer`` instead renders one take of ``--transfer-s`` seconds (default
90) in one process and reports what a worker would send back for it: the MP3,
the OGG, the record, and the whole pickled reply (:class:`RenderedTake`).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

TRACKS = 8


class Failed(Exception):
    """The command exited non-zero; the message is its last error line."""


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")] or proc.stderr.splitlines()[-1:]
        raise Failed(f"exit {proc.returncode} after {wall:.1f} s: {errors[-1] if errors else ''}")
    return wall, json.loads(proc.stdout)


def batch(args, tmp: Path, model: Path, env: dict[str, str]) -> list[dict]:
    prompts = tmp / "prompts"
    prompts.mkdir()
    shipped = sorted(p for p in (REPO / "prompts").iterdir() if p.suffix in (".toml", ".txt"))
    for copy in ("a", "b"):
        for p in shipped:
            shutil.copy(p, prompts / f"{copy}_{p.name}")
    assert len(list(prompts.iterdir())) == TRACKS
    base = [sys.executable, "-m", "tydust_gen", "--all", "-d", str(args.duration), "--seed", "7", "--json", "-q",
            "--model", str(model)]  # fmt: skip
    configs = [("single", []), ("workers=1", ["--workers", "1"]), ("workers=2", ["--workers", "2"])]
    rows = []
    for repeat in range(args.repeats):
        for name, extra in configs:
            out = tmp / f"out-{name}-{repeat}"
            load = os.getloadavg()[0]
            try:
                wall, doc = run([*base, "-o", str(out), *extra], tmp, env)
            except Failed as exc:  # e.g. Ray's start timing out on an overloaded machine: say so, go on
                rows.append({"config": name, "repeat": repeat, "failed": str(exc), "loadavg_1min_before": round(load, 2)})
                print(f"{name:10s} FAILED {exc}   (load average {load:.1f})", flush=True)
                continue
            takes = doc["tracks"]
            assert len(takes) == TRACKS and all(t["ok"] for t in takes)
            rows.append({
                "config": name, "repeat": repeat, "wall_s": round(wall, 2), "load_s": doc["load_s"],
                "device": doc["device"], "track_total_s": round(sum(t["timings_s"]["total"] for t in takes), 2),
                "loadavg_1min_before": round(load, 2),
            })  # fmt: skip
            print(f"{name:10s} wall {wall:7.1f} s   model load {doc['load_s']:5.1f} s   "
                  f"sum of track totals {rows[-1]['track_total_s']:6.1f} s   (load average {load:.1f})", flush=True)  # fmt: skip
    return rows


def transfer(args, tmp: Path, model: Path, env: dict[str, str]) -> dict:
    from tydust_gen.export.verify import ExportedFile
    from tydust_gen.runs.distributed import RenderedTake
    from tydust_gen.runs.pipeline import TrackResult

    shutil.copytree(REPO / "prompts", tmp / "prompts")
    wall, doc = run([sys.executable, "-m", "tydust_gen", "phase4_peak", "-d", str(args.transfer_s), "--seed", "7",
                     "--json", "-q", "-o", "out", "--model", str(model)], tmp, env)  # fmt: skip
    take = doc["tracks"][0]
    out = tmp / "out"
    names = ["phase4_peak.mp3", "phase4_peak.ogg", "phase4_peak.json"]
    files = {n: (out / n).read_bytes() for n in names}
    keys = ("format", "size_bytes", "duration_s", "bitrate_bps", "sample_rate", "channels", "sha256")
    result = TrackResult(name="phase4_peak", files=[ExportedFile(path=Path(f["path"]), **{k: f[k] for k in keys}) for f in take["files"]],
                         loudness=take["loudness"], timings=take["timings_s"])  # fmt: skip
    reply = len(pickle.dumps(RenderedTake(result, files), protocol=5))
    row = {f"{n.rsplit('.', 1)[1]}_bytes": len(b) for n, b in files.items()}
    row.update({"seconds": args.transfer_s, "reply_pickled_bytes": reply, "render_wall_s": round(wall, 1)})
    print(json.dumps(row, indent=2))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of music per track")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--transfer", action="store_true", help="measure the bytes a worker returns for one take instead")
    ap.add_argument("--transfer-s", type=float, default=90.0)
    ap.add_argument("--out", type=Path, help="write the figures here as JSON")
    args = ap.parse_args()

    from tydust_gen.model.tiny import save_tiny_model

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_tiny_model(tmp / "tiny")
        figures = transfer(args, tmp, model, env) if args.transfer else batch(args, tmp, model, env)
    payload = {"machine": {"cores": len(os.sched_getaffinity(0)), "python": platform.python_version()},
               "duration_s": args.duration, "tracks": TRACKS, "figures": figures}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
