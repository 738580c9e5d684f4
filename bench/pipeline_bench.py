"""Wall time of the whole CLI pipeline on the tiny random MusicGen, per stage.

Not a test: run by hand, e.g.

    python bench/pipeline_bench.py --duration 90 --repeats 3

It saves the tiny model to a temporary folder, runs ``tydust-gen TRACK --json``
in-process ``--repeats`` times on the shipped ``phase4_peak`` prompt, and prints
the median of each stage the JSON result reports (generate, decode, audio,
master_export) plus the command's total wall time. The tiny model's decoder is
~60 k parameters, so "generate" here measures the Python/transformers loop
overhead per step, not model compute; full-size speed is in ``bench/`` issue-5
harness.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=90.0, help="seconds of music")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--track", default="phase4_peak")
    ap.add_argument("--backend", default="fast", help="fast, fast-int8 or stock")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from typer.testing import CliRunner

    from tydust_gen.cli import app
    from tydust_gen.model.tiny import save_tiny_model

    runner = CliRunner()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_tiny_model(tmp / "tiny")
        shutil.copytree(REPO / "prompts", tmp / "prompts")
        os.chdir(tmp)
        for i in range(args.repeats):
            t0 = time.perf_counter()
            res = runner.invoke(
                app,
                [args.track, "-d", str(args.duration), "--model", str(model), "--seed", str(i), "--json", "-q",
                 "-o", f"out{i}", "--backend", args.backend],
            )  # fmt: skip
            wall = time.perf_counter() - t0
            if res.exit_code != 0:
                raise SystemExit(res.stderr)
            timings = json.loads(res.stdout)["tracks"][0]["timings_s"]
            rows.append({**timings, "wall": wall})
    keys = ["generate", "decode", "audio", "master_export", "wall"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"tiny model, backend {args.backend}, {args.duration:g} s, {args.repeats} runs")  # fmt: skip
    for k in keys:
        values = [r[k] for r in rows]
        print(f"  {k:14s} median {statistics.median(values):7.2f} s   (min {min(values):.2f}, max {max(values):.2f})")
    print(json.dumps({"duration_s": args.duration, "runs": rows}))


if __name__ == "__main__":
    main()
