"""Batches on Ray workers (--workers, --ray): the same takes as one process, and the faults of a cluster.

One local Ray (2 CPUs) serves the whole module: it is slow to start on a 2-core machine. Runs inside
pytest reuse it (a process already connected to Ray renders there); the Ctrl-C test drives it from a
separate process through its address, as `--ray HOST:PORT` does on a real cluster. Every test checks
that no staging folder, lock or partial output is left.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, files_under

from tydust_gen.export.ffmpeg import find_ffmpeg
from tydust_gen.model import loading as engine

# Before ray is first imported: a single-machine Ray on 127.0.0.1, never on the machine's network address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

TRACKS = ["game_over", "menu_calm", "phase3_combat", "phase4_peak"]
ARGS = ["-d", "0.4", "--seed", "11", "-n", "2"]  # four tracks x two variations
TAKES = [f"{t}_v{i}" for t in TRACKS for i in (1, 2)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray for the module; its workers get the environment the tests' _hermetic fixture sets."""
    ray = pytest.importorskip("ray")
    base = tmp_path_factory.getbasetemp()
    (base / "hf_home").mkdir(exist_ok=True)
    env = {"HF_HOME": str(base / "hf_home"), "HF_HUB_OFFLINE": "1", "TYDUST_KERNEL_CACHE": str(base / "kernels"),
           "PYTHONPATH": str(REPO / "src")}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    from tydust_gen.model import cpu_kernel

    cpu_kernel.load()  # built once here, not by two workers at once
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
            break
        except Exception:  # noqa: BLE001 - Ray gives its raylet a fixed 30 s to register; a busy machine can miss it
            ray.shutdown()
            if attempt == 2:
                raise
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def decoded_sha256(path: Path) -> str:
    """sha256 of the PCM ffmpeg decodes from ``path`` (an independent reader of the files)."""
    pcm = subprocess.run(
        [find_ffmpeg().path, "-hide_banner", "-loglevel", "error", "-i", str(path), "-f", "s16le", "-"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    assert len(pcm) > 10_000
    return hashlib.sha256(pcm).hexdigest()


def audio_of(out: Path, takes: list[str]) -> dict[str, str]:
    return {f"{t}.{fmt}": decoded_sha256(out / f"{t}.{fmt}") for t in takes for fmt in ("mp3", "ogg")}


def no_leftovers(root: Path) -> None:
    names = files_under(root) if root.exists() else []
    assert not [n for n in names if ".tydust-staging-" in n or n.endswith(".lock")], names


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir) -> dict[str, str]:
    """The decoded audio of the four tracks x two takes rendered in one process, as before this change.

    With one thread, as each of the two workers on two cores has: EnCodec's decode on the CPU rounds
    differently with another thread count (the tokens are the same; samples differ by about 1e-7).
    """
    import torch
    from typer.testing import CliRunner

    from tydust_gen.cli import app

    out = tmp_path_factory.mktemp("single") / "out"
    argv = [*TRACKS, *ARGS, "--prompts-dir", str(REPO / "prompts"), "-o", str(out), "--model", str(tiny_model_dir)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(app, argv, env={"HF_HUB_OFFLINE": "1"}, catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.stderr
    return audio_of(out, TAKES)


def test_workers_render_the_same_takes_as_one_process_though_one_dies(cluster, workdir, run_cli, reference, monkeypatch):
    died = workdir / "died"
    monkeypatch.setenv("TYDUST_TEST_WORKER_DIES", f"game_over:5@{died}")  # a real SIGKILL at step 5, once
    result = run_cli(*TRACKS, *ARGS, "-o", "out", "--workers", "2", "--json")
    assert result.exit_code == 0, result.stderr
    out = workdir / "out"
    assert files_under(out) == sorted(f"{t}.{ext}" for t in TAKES for ext in ("json", "mp3", "ogg"))
    # every take, the retried ones too, is the audio one process makes from the same seeds
    assert audio_of(out, TAKES) == reference
    assert died.exists()
    deaths = [x for x in result.stderr.splitlines() if x.startswith("warning:") and "died" in x]  # not Ray's own lines
    assert len(deaths) == 1 and re.fullmatch(
        r"warning: game_over: worker w[12] died \(its process ended\); trying again on another worker \(try 2 of 3\)", deaths[0]
    ), result.stderr
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["device"] == "ray: 2 × cpu"
    assert [t["track"] for t in doc["tracks"]] == TAKES and {t["status"] for t in doc["tracks"]} == {"ok"}
    for t in doc["tracks"]:
        rec = json.loads((out / f"{t['track']}.json").read_text())
        # the record was written here, for the files as verified here, from this machine's prompt file
        for f in rec["files"]:
            data = (out / f["path"]).read_bytes()
            assert f["size_bytes"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
        prompt = next((workdir / "prompts").glob(f"{rec['track']}.*"))
        assert rec["prompt"]["file"] == str(Path("prompts") / prompt.name)
        assert rec["prompt"]["file_sha256"] == hashlib.sha256(prompt.read_bytes()).hexdigest()
        assert rec["settings"]["seed"] == t["seed"] and rec["worker"]["label"] in ("w1", "w2")
        assert rec["worker"]["tries"] == (2 if rec["track"] == "game_over" else 1)
    assert "worker w1: cpu on" in result.stderr and "worker w2: cpu on" in result.stderr
    no_leftovers(workdir)
    # the records say the takes are current: --skip-existing leaves them alone without starting a worker
    again = run_cli(*TRACKS, *ARGS, "-o", "out", "--workers", "2", "--skip-existing", "--json")
    assert again.exit_code == 0 and {t["status"] for t in json.loads(again.stdout)["tracks"]} == {"skipped"}
    assert "worker w1" not in again.stderr


def test_a_killer_track_fails_after_three_tries_and_a_broken_one_fails_once(cluster, workdir, run_cli, monkeypatch):
    prompts = workdir / "prompts"
    for name in ("phase3_combat", "phase4_peak", "menu_calm"):
        (prompts / f"{name}.toml").unlink()
    (prompts / "game_over.txt").unlink()
    (prompts / "killer.toml").write_text('duration = 0.4\nprompt = "dark synth sting"\n')
    (prompts / "calm.toml").write_text('duration = 0.4\nprompt = "calm pads"\n')
    # fails by itself once the model is loaded: the tiny model's window is at most 40.88 s
    (prompts / "broken.toml").write_text('duration = 42\nwindow = 42\nprompt = "long pads"\n')
    monkeypatch.setenv("TYDUST_TEST_WORKER_DIES", "killer:5")  # kills its worker every time
    result = run_cli("--all", "-o", "out", "--workers", "2", "--json")
    assert result.exit_code == 1, result.stderr
    assert len(re.findall(r"killer: worker w[12] died", result.stderr)) == 2  # before tries 2 and 3
    errors = sorted(x for x in result.stderr.splitlines() if x.startswith("error:"))
    assert errors == [
        "error: broken: window of 42 s is longer than this model allows (40.88 s); use a smaller --window",
        "error: killer: the worker rendering it died 3 times (last: its process ended); it may need more memory than a worker has",
    ]
    assert "broken: worker" not in result.stderr  # failed for its own reasons: not tried again
    statuses = {t["track"]: t["status"] for t in json.loads(result.stdout)["tracks"]}
    assert statuses == {"broken": "failed", "calm": "ok", "killer": "failed"}
    assert files_under(workdir / "out") == ["calm.json", "calm.mp3", "calm.ogg"]
    no_leftovers(workdir)


def test_a_continuation_waits_for_what_it_continues_and_fails_with_it(cluster, workdir, run_cli):
    """Two workers, two chains: a continuation is not started beside the track it continues (its file does
    not exist yet, nothing older does either) but after it is written, and fails when that track fails."""
    prompts = workdir / "prompts"
    for p in list(prompts.iterdir()):
        p.unlink()
    (prompts / "a_first.toml").write_text('duration = 1.5\nseed = 3\nprompt = "dark synth bass"\n')
    (prompts / "b_then.toml").write_text('duration = 0.4\nseed = 3\nprompt = "intense synth"\ncontinue_from = "a_first"\ncontext = 0.6\n')
    # fails by itself once the model is loaded: the tiny model's window is at most 40.88 s
    (prompts / "c_broken.toml").write_text('duration = 42\nwindow = 42\nprompt = "long pads"\n')
    (prompts / "d_after_broken.toml").write_text('duration = 0.4\nprompt = "calm"\ncontinue_from = "c_broken"\n')
    result = run_cli("--all", "-o", "out", "--workers", "2", "--json")
    assert result.exit_code == 1, result.stderr
    tracks = {t["track"]: t for t in json.loads(result.stdout)["tracks"]}
    assert {name: t["status"] for name, t in tracks.items()} == {
        "a_first": "ok", "b_then": "ok", "c_broken": "failed", "d_after_broken": "failed",
    }, result.stderr  # fmt: skip
    assert tracks["b_then"]["continuation"]["sha256"] == hashlib.sha256((workdir / "out/a_first.ogg").read_bytes()).hexdigest()
    assert tracks["d_after_broken"]["error"] == "it continues c_broken, which failed in this run; fix c_broken and render both again"
    assert files_under(workdir / "out") == sorted(f"{t}.{x}" for t in ("a_first", "b_then") for x in ("json", "mp3", "ogg"))
    no_leftovers(workdir)


def test_unreachable_cluster_exits_3_before_any_work(cluster, workdir, run_cli, monkeypatch):
    monkeypatch.setattr(engine, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    result = run_cli("game_over", "-d", "0.4", "-o", "out", "--ray", f"127.0.0.1:{port}")
    assert result.exit_code == 3
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot reach the Ray cluster at 127.0.0.1:{port} (Connection refused); "
        "start it with `ray start --head` there, or check the address and port"
    )
    assert not (workdir / "out").exists() or files_under(workdir / "out") == []


def test_ctrl_c_on_the_driver_stops_the_workers_and_writes_nothing(cluster, workdir, tiny_model_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "TYDUST_TEST_HOOK": "generate:5", "TYDUST_TEST_HOOK_SLEEP": "120"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tydust_gen", "game_over", "menu_calm", "-d", "0.4", "-o", "out", "--ray", cluster,
         "--workers", "2", "--debug", "--model", str(tiny_model_dir)],  # --debug: worker output comes here
        cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    lines, pid = [], None
    deadline = time.monotonic() + 180
    while pid is None and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"pid=(\d+).*tydust-test-hook: generate:5", line)  # forwarded from the worker by Ray
        pid = int(found.group(1)) if found else None
    if pid is None:
        proc.kill()
        pytest.fail("no worker reached step 5: " + "".join(lines))
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "error: interrupted; unfinished tracks were not written"
    assert not (workdir / "out").exists() or files_under(workdir / "out") == []
    no_leftovers(workdir)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the paused worker was stopped, not left to finish
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"worker pid {pid} still runs")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workers", "0"], "error: --workers must be at least 1, got 0"),
        (["--workers", "two"], "error: --workers must be a whole number, got 'two'; e.g. --workers 2"),
        (["--ray", "nowhere"], "error: --ray takes auto, local or HOST:PORT (e.g. --ray 10.0.0.5:6379), got 'nowhere'"),
        (["--devices", "cuda:0,cuda:0"], "error: --devices names a GPU twice (cuda:0,cuda:0); name each GPU once"),
        (["--devices", "gpu0"], "error: --devices takes cpu or cuda:N, comma-separated (e.g. cuda:0,cuda:1), got 'gpu0'"),
        (["--devices", "cuda:0", "--ray", "auto"],
         "error: --devices names GPUs of this machine; on a cluster use --workers N (one GPU each with --device cuda)"),
        (["--workers", "3", "--devices", "cpu,cpu"], "error: --workers 3 disagrees with the 2 device(s) of --devices; drop --workers"),
        (["--workers", "2", "--device", "cuda:1"],
         "error: --device cuda:N picks one GPU; with workers use --device cuda (one GPU each) or --devices cuda:0,cuda:1"),
    ],
)  # fmt: skip
def test_bad_scale_options_are_refused_before_anything(workdir, run_cli, monkeypatch, args, message):
    monkeypatch.setattr(engine, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    result = run_cli("game_over", "-o", "out", *args)
    assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1] == message
    assert not (workdir / "out").exists()


def test_without_ray_installed_the_options_say_what_to_install(workdir, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    result = run_cli("game_over", "-d", "0.4", "-o", "out", "--workers", "2")
    assert result.exit_code == 3
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --workers, --devices and --ray need Ray, which is not installed; pip install 'tydust-gen[ray]'"
    )
    no_leftovers(workdir)


def test_a_batch_on_the_cluster_this_process_drives_keeps_rays_printer_off_stdout(cluster, capsys):
    """A program (here: the tests) that started Ray itself and runs a batch on it: Ray's printer, started by
    that program's ray.init, stays off stdout too. Seen in a run: a retried task's message after --json."""
    ray = pytest.importorskip("ray")
    from ray._private import worker as ray_worker

    from tydust_gen.runs import distributed

    def ray_prints(words: str) -> str:
        # words of letters only: Ray's deduplicator masks digits, and hides a line like one it printed before
        ray_worker.print_to_stdstream({"lines": [f"{words} failed, will be retried"], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        return capsys.readouterr().out

    before = ray_worker._worker_logs_enabled
    ray_worker._worker_logs_enabled = True  # as the program's own ray.init leaves it
    try:
        first = "".join(random.choices(string.ascii_letters, k=24))
        assert first in ray_prints(first)  # the printer is on
        request = distributed.scale_request(ray="auto", workers=None, devices=None)
        owned = distributed.RayScaleOut(request, "tiny")._connect(ray, listener=None)
        assert owned is False  # the program's cluster: not ours to stop
        assert ray_prints("".join(random.choices(string.ascii_letters, k=24))) == ""
    finally:
        ray_worker._worker_logs_enabled = before


def test_rays_cluster_error_printer_stays_off_stdout(capsys):
    """Ray prints cluster errors ("... the task will be retried") on stdout whatever ``log_to_driver`` says;
    seen in CI breaking ``--json`` while a killed worker's track was retried."""
    ray = pytest.importorskip("ray")
    from ray._private import worker as ray_worker

    from tydust_gen.runs import distributed

    before = ray_worker._worker_logs_enabled
    words = "".join(random.choices(string.ascii_letters, k=24))  # letters: Ray's deduplicator masks digits
    line = {"lines": [f"task {words} failed, so the task will be retried"], "pid": "raylet", "is_err": False}
    try:
        distributed._quiet_ray_stdout(ray, worker_logs=True)
        ray_worker.print_to_stdstream(dict(line), ignore_prefix=False)
        assert "will be retried" in capsys.readouterr().out  # the printer Ray runs in every driver
        line["lines"] = [line["lines"][0] + " again"]
        distributed._quiet_ray_stdout(ray, worker_logs=False)
        ray_worker.print_to_stdstream(dict(line), ignore_prefix=False)
        assert capsys.readouterr().out == ""
    finally:
        ray_worker._worker_logs_enabled = before
