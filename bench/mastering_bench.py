"""Time the game-ready audio stages on a 90 s, 44.1 kHz stereo synthetic track.

Stages timed per run (the loop-mode path, the most expensive one):

1. ``remove_dc`` of the 93 s generated audio (90 s loop + 3 s overrun),
2. ``make_loop`` to exactly 90 s,
3. ``master_for_encoding`` at -14 LUFS / -1 dBTP with circular limiting: master,
   encode MP3 192k + OGG q6 with ffmpeg, decode both and measure their true
   peak, re-master if needed,
4. ``seam_metric`` of the loop.

Run: ``PYTHONPATH=src:tests python bench/mastering_bench.py [--runs 3]``.
Prints each run and the median; record it in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synth.py

from synth import SR, encode, music  # noqa: E402

from tydust_gen.audio.loop import make_loop, seam_metric  # noqa: E402
from tydust_gen.audio.master import remove_dc  # noqa: E402
from tydust_gen.export.loudness import master_for_encoding

LOOP_S = 90.0  # s
OVERRUN_S = 3.0  # s


def run_once(raw, folder: Path) -> dict[str, float]:
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    clean = remove_dc(raw, SR)
    t1 = time.perf_counter()
    loop = make_loop(clean, SR, int(LOOP_S * SR))
    t2 = time.perf_counter()
    encode_s = 0.0

    def encode_both(result):
        nonlocal encode_s
        e0 = time.perf_counter()
        paths = [encode(result.samples, SR, folder / "b.mp3"), encode(result.samples, SR, folder / "b.ogg")]
        encode_s += time.perf_counter() - e0
        return paths

    enc = master_for_encoding(loop.samples, SR, encode_both, target_lufs=-14.0, ceiling_dbtp=-1.0, circular=True)
    t3 = time.perf_counter()
    seam = seam_metric(enc.master.samples, SR)
    t4 = time.perf_counter()
    assert enc.ceiling_met and seam.passed
    times["dc"] = t1 - t0
    times["loop"] = t2 - t1
    times["master+peak check (excl. encode)"] = t3 - t2 - encode_s
    times["encode mp3+ogg"] = encode_s
    times["seam metric"] = t4 - t3
    times["total"] = t4 - t0
    times["total excl. encode"] = t4 - t0 - encode_s
    times["tries"] = enc.tries
    times["limiter dB"] = enc.master.limiter_max_reduction_db
    times["mp3 dBTP"], times["ogg dBTP"] = enc.encoded_true_peaks_dbtp
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    raw = music(LOOP_S + OVERRUN_S, seed=7, dc=0.3, level=0.25)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            r = run_once(raw, Path(tmp))
            results.append(r)
            print(f"run {i + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
    print("median:")
    for key in results[0]:
        print(f"  {key}: {statistics.median(r[key] for r in results):.3f}")


if __name__ == "__main__":
    main()
