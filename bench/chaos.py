"""Randomized fault campaign: signals and kills at uniformly random moments, then count what was lost.

Not part of the test suite (it runs for many minutes). Each trial starts real
``tydust-gen`` processes on the tiny random model and hits one of them with
SIGINT, SIGTERM or SIGKILL after a delay drawn uniformly from zero to the
length of an undisturbed run (the median of the last few clean runs), in one of three situations:

* ``fresh``: no take exists yet (no ``--force``);
* ``force``: a complete take exists and the run replaces it with ``--force``;
* ``concurrent``: two writers of the same track start together (``--force``), one is hit.

After each trial it checks the output folder, then makes one clean run of the
track (``--force``) and checks again. It counts:

* **lost takes**: a complete take existed before the trial and no complete take exists after it;
* **mixed takes**: the MP3, OGG and record present do not belong together (the record's sizes and
  sha256 do not match the audio files, or only part of a take is present);
* **leftovers**: anything besides ``TRACK.mp3/.ogg/.json`` (staging folders, temporary files, lock
  files) still in the output folder after the next clean run.

* **hangs**: a run still going after RUN_TIMEOUT_S (its stacks are saved with py-spy, then it is killed).

Goal: 0 / 0 / 0 / 0. Usage::

    python bench/chaos.py --trials 200 --out bench/results/chaos.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRACK = "chaos"
FINAL = {f"{TRACK}.mp3", f"{TRACK}.ogg", f"{TRACK}.json"}
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
SITUATIONS = ("fresh", "force", "concurrent")
DURATION_S = "1.0"  # seconds of music per take: long enough for every stage to take a visible share
RUN_TIMEOUT_S = 300
HANG_EXIT = -999  # the exit code recorded for a run that hung and was killed
RECENT_RUNS = 5  # clean runs whose median length is the range of the next delay


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def take_state(out: Path) -> tuple[str, str | None]:
    """``("none" | "complete" | "mixed", identity)`` of the take in ``out``; identity = record sha256."""
    present = {p.name for p in out.iterdir()} & FINAL if out.exists() else set()
    if not present:
        return "none", None
    if present != FINAL:
        return "mixed", None
    try:
        record = json.loads((out / f"{TRACK}.json").read_text())
        for f in record["files"]:
            path = out / Path(f["path"]).name
            if path.stat().st_size != f["size_bytes"] or sha256(path) != f["sha256"]:
                return "mixed", None
    except (OSError, ValueError, KeyError) as exc:
        return "mixed", repr(exc)
    return "complete", sha256(out / f"{TRACK}.json")


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name not in FINAL) if out.exists() else []


class Campaign:
    def __init__(self, root: Path, python: str):
        self.root = root
        self.python = python
        self.prompts = root / "prompts"
        self.prompts.mkdir(parents=True, exist_ok=True)
        (self.prompts / f"{TRACK}.txt").write_text("dark synth boss battle\n", encoding="utf-8")
        self.model = root / "tiny-musicgen"
        subprocess.run(
            [python, "-c", f"from tydust_gen.model.tiny import save_tiny_model; save_tiny_model({str(self.model)!r})"],
            check=True, capture_output=True,
        )  # fmt: skip
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1"}

    def command(self, out: Path, seed: int, force: bool) -> list[str]:
        cmd = [self.python, "-m", "tydust_gen", "generate", TRACK, "-d", DURATION_S, "--seed", str(seed),
               "--model", str(self.model), "--prompts-dir", str(self.prompts), "-o", str(out), "--quiet"]  # fmt: skip
        return cmd + (["--force"] if force else [])

    def start(self, out: Path, seed: int, force: bool) -> subprocess.Popen:
        # Own session: the signal reaches this process as a terminal's would reach its foreground job.
        return subprocess.Popen(self.command(out, seed, force), env=self.env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip

    def run(self, out: Path, seed: int, force: bool) -> tuple[int, float]:
        """A clean run; one that outlives RUN_TIMEOUT_S is a hang: its Python stacks (py-spy) go to chaos-hangs/ beside the campaign's folder, then it is killed."""
        t0 = time.perf_counter()
        proc = subprocess.Popen(self.command(out, seed, force), env=self.env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        try:
            proc.wait(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.dump_stacks(proc, f"seed{seed}")
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return HANG_EXIT, time.perf_counter() - t0
        finally:
            proc.stderr.close()
        return proc.returncode, time.perf_counter() - t0

    def dump_stacks(self, proc: subprocess.Popen, label: str) -> None:
        folder = self.root.parent / "chaos-hangs"
        folder.mkdir(exist_ok=True)
        try:
            spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
            dump = subprocess.run([spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True, timeout=60)
            text = dump.stdout + dump.stderr
        except (OSError, subprocess.TimeoutExpired) as exc:
            text = f"py-spy failed: {exc}"
        (folder / f"{label}-{proc.pid}.txt").write_text(text)
        print(f"HANG: run {label} (pid {proc.pid}) passed {RUN_TIMEOUT_S} s; stacks in {folder}", flush=True)


def hit(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        if sig == signal.SIGKILL:
            os.killpg(proc.pid, sig)  # a hard kill takes the whole group, ffmpeg children included
        else:
            os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass


def write_results(path: Path, counts: dict, span: float, trials: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"counts": counts, "undisturbed_run_s": span, "trials": trials}, indent=1) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write the counts and every trial as JSON here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    counts = {"lost": 0, "mixed": 0, "leftovers": 0, "hangs": 0, "trials": 0}
    trials = []
    with tempfile.TemporaryDirectory(prefix="tydust-chaos-") as tmp:
        c = Campaign(Path(tmp), sys.executable)
        # An undisturbed run's length sets the range of the random delays.
        lengths = []
        for i in range(3):
            code, took = c.run(Path(tmp) / f"warm{i}", 1, False)
            assert code == 0, f"an undisturbed run failed with exit {code}"
            lengths.append(took)
        span = statistics.median(lengths)
        print(f"undisturbed run: median {span:.2f} s over {len(lengths)}", flush=True)
        for n in range(args.trials):
            situation = rng.choice(SITUATIONS)
            sig_name = rng.choice(sorted(SIGNALS))
            delay = rng.uniform(0.0, span)
            # One output folder for the whole campaign: each trial starts from what the last clean run left.
            out = Path(tmp) / "out"
            if situation == "fresh":
                for name in FINAL:
                    (out / name).unlink(missing_ok=True)
            elif take_state(out)[0] != "complete":
                code, _ = c.run(out, 1000 + n, True)
                assert code == 0, f"setting up trial {n} failed with exit {code}"
            before = take_state(out)
            procs = [c.start(out, 2000 + n, situation != "fresh")]
            if situation == "concurrent":
                procs.append(c.start(out, 3000 + n, True))
            victim = rng.choice(procs)
            time.sleep(delay)  # the point of the campaign: a moment drawn at random, not an event
            hit(victim, SIGNALS[sig_name])
            codes = []
            for p in procs:
                try:
                    codes.append(p.wait(timeout=RUN_TIMEOUT_S))
                except subprocess.TimeoutExpired:
                    c.dump_stacks(p, f"trial{n}")
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
                    codes.append(HANG_EXIT)
            after = take_state(out)
            lost = before[0] == "complete" and after[0] != "complete"
            mixed = after[0] == "mixed"
            # the next clean run: it must succeed and leave nothing else behind
            next_code, next_took = c.run(out, 4000 + n, True)
            # The machine's load changes during a long campaign: the delays follow the recent clean runs' length.
            lengths = (lengths + [next_took])[-RECENT_RUNS:]
            span = statistics.median(lengths)
            after_next = take_state(out)
            left = leftovers(out)
            mixed = mixed or after_next[0] != "complete"
            counts["trials"] += 1
            counts["lost"] += lost
            counts["mixed"] += mixed
            counts["leftovers"] += bool(left)
            counts["hangs"] += HANG_EXIT in codes or next_code == HANG_EXIT
            trial = {"n": n, "situation": situation, "signal": sig_name, "delay_s": round(delay, 3), "exit_codes": codes,
                     "before": before[0], "after": after[0], "next_exit": next_code, "after_next": after_next[0],
                     "leftovers": left, "lost": lost, "mixed": mixed}  # fmt: skip
            trials.append(trial)
            flag = " <-- " + ", ".join(k for k in ("lost", "mixed") if trial[k]) if (lost or mixed or left) else ""
            print(f"{n:3d} {situation:10s} {sig_name:7s} at {delay:5.2f} s exit {codes} -> {after[0]}; next {next_code} "
                  f"-> {after_next[0]} {left or ''}{flag}", flush=True)  # fmt: skip
            for p in procs:
                if p.stderr:
                    p.stderr.close()
            if args.out:  # after every trial, so a campaign cut short still reports what it saw
                write_results(args.out, counts, span, trials)
    print(json.dumps(counts))
    if args.out:
        write_results(args.out, counts, span, trials)
    return 0 if counts["lost"] == counts["mixed"] == counts["leftovers"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
