"""End-to-end CLI tests: the real command on the tiny model, real ffmpeg, files read back with mutagen."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, files_under
from mutagen.mp3 import MP3, BitrateMode
from mutagen.oggvorbis import OggVorbis

from tydust_gen.export.loudness import decode_audio
from tydust_gen.model import loading as engine

PROMPT_FILES = ["prompts/game_over.txt", "prompts/menu_calm.toml", "prompts/phase3_combat.toml", "prompts/phase4_peak.toml"]


def check_mp3(path: Path, seconds: float) -> None:
    info = MP3(path).info
    assert info.bitrate_mode == BitrateMode.CBR
    assert abs(info.bitrate - 192_000) <= 192  # mutagen's estimate from byte counts rounds short files
    assert info.sample_rate == 44_100 and info.channels == 2
    from tydust_gen.export.verify import mp3_gapless_duration

    assert abs(mp3_gapless_duration(path, 44_100) - seconds) < 0.05


def check_ogg(path: Path, seconds: float) -> None:
    ogg = OggVorbis(path)
    assert ogg.info.sample_rate == 44_100 and ogg.info.channels == 2
    assert abs(ogg.info.length - seconds) < 0.05


@pytest.mark.slow
def test_90_second_track_end_to_end(workdir, run_cli, private_tmp):
    """The README's main job on the tiny model: 90 s from the prompt file, 5 windows, two verified files, nothing else."""
    result = run_cli("phase4_peak", "--json", "--seed", "42")
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    track = payload["tracks"][0]
    assert track["ok"] and track["seed"] == 42 and track["duration_s"] == 90.0
    assert track["windows"] == 5 and track["steps"] == 4500 + 5 * 3
    out = workdir / "assets/music/darkwave"
    assert files_under(workdir) == sorted(PROMPT_FILES + ["assets/music/darkwave/phase4_peak.json", "assets/music/darkwave/phase4_peak.mp3", "assets/music/darkwave/phase4_peak.ogg"])
    check_mp3(out / "phase4_peak.mp3", 90.0)
    check_ogg(out / "phase4_peak.ogg", 90.0)
    comment = MP3(out / "phase4_peak.mp3").tags.getall("COMM")[0].text[0]
    assert comment.startswith("Darkwave peak intensity music") and "seed=42" in comment and "model=" in comment
    assert list(private_tmp.iterdir()) == []
    assert "phase4_peak.mp3" in result.stderr and "192 kbit/s" in result.stderr


def test_several_tracks_load_the_model_once(workdir, run_cli, monkeypatch):
    calls = []
    real = engine.load_model
    monkeypatch.setattr(engine, "load_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = run_cli("game_over", "menu_calm", "-d", "0.5", "--json", "--out-dir", "out")
    assert result.exit_code == 0, result.stderr
    assert len(calls) == 1
    assert files_under(workdir / "out") == ["game_over.json", "game_over.mp3", "game_over.ogg", "menu_calm.json", "menu_calm.mp3", "menu_calm.ogg"]
    tracks = json.loads(result.stdout)["tracks"]
    assert [t["track"] for t in tracks] == ["game_over", "menu_calm"]
    assert all(t["seed_was_random"] for t in tracks)
    for name in ("game_over", "menu_calm"):
        check_mp3(workdir / "out" / f"{name}.mp3", 0.5)
        check_ogg(workdir / "out" / f"{name}.ogg", 0.5)


def test_multi_window_cli_run_has_exact_length(workdir, run_cli):
    result = run_cli("game_over", "-d", "2.7", "--window", "1", "--stride", "0.6", "--seed", "1", "--json")
    assert result.exit_code == 0, result.stderr
    track = json.loads(result.stdout)["tracks"][0]
    assert track["windows"] == 4 and track["steps"] == 135 + 4 * 3  # 50 + 30 + 30 + 25 frames
    check_mp3(workdir / "assets/music/game_over.mp3", 2.7)
    check_ogg(workdir / "assets/music/game_over.ogg", 2.7)


def test_same_seed_gives_identical_audio(workdir, run_cli):
    for out in ("a", "b"):
        assert run_cli("game_over", "-d", "0.6", "--seed", "9", "-o", out).exit_code == 0
    # Encoders are deterministic, so identical samples give identical OGG audio pages.
    from mutagen.oggvorbis import OggVorbis

    a, b = (workdir / "a/game_over.ogg").read_bytes(), (workdir / "b/game_over.ogg").read_bytes()
    assert len(a) == len(b) and OggVorbis(workdir / "a/game_over.ogg").info.length == OggVorbis(workdir / "b/game_over.ogg").info.length
    assert a[-2000:] == b[-2000:]


def test_existing_outputs_are_refused_then_replaced_with_force(workdir, run_cli):
    assert run_cli("game_over", "-d", "0.4", "-o", "out").exit_code == 0
    mp3 = workdir / "out/game_over.mp3"
    before = mp3.read_bytes()
    result = run_cli("game_over", "-d", "0.4", "-o", "out")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {Path('out/game_over.mp3')} already exists; pass --force to replace it"
    assert mp3.read_bytes() == before
    assert run_cli("game_over", "-d", "0.6", "-o", "out", "--force").exit_code == 0
    check_mp3(mp3, 0.6)


def test_a_record_left_alone_is_not_overwritten_without_force(workdir, run_cli):
    assert run_cli("game_over", "-d", "0.4", "-o", "out").exit_code == 0
    (workdir / "out/game_over.mp3").unlink()
    (workdir / "out/game_over.ogg").unlink()
    record = (workdir / "out/game_over.json").read_bytes()
    result = run_cli("game_over", "-d", "0.4", "-o", "out")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {Path('out/game_over.json')} already exists; pass --force to replace it"
    assert (workdir / "out/game_over.json").read_bytes() == record
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["game_over.json"]


def test_json_run_that_stops_early_still_prints_an_object(workdir, run_cli):
    result = run_cli("phase9", "--json")
    assert result.exit_code == 2
    payload = json.loads(result.stdout)
    assert payload["ok"] is False and payload["exit_code"] == 2 and payload["tracks"] == []
    assert payload["error"].startswith("no prompt file for track 'phase9'")
    assert result.stderr.strip() == f"error: {payload['error']}"


def test_quiet_prints_nothing_and_piped_output_has_no_progress_bar(workdir, run_cli):
    quiet = run_cli("game_over", "-d", "0.4", "-o", "q", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout == ""
    piped = run_cli("game_over", "-d", "0.4", "-o", "p")
    assert piped.exit_code == 0
    assert "━" not in piped.stderr and "eta" not in piped.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_auto_device_without_gpu_warns_and_runs_on_the_cpu(workdir, run_cli):
    result = run_cli("game_over", "-d", "0.4", "-o", "p")
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "warning: no CUDA GPU found; generating on the CPU, which is much slower" in lines
    assert any(line.startswith("loading ") and line.endswith(" on cpu…") for line in lines)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_device_with_gpu_runs_on_cuda_without_warning(workdir, run_cli):
    result = run_cli("game_over", "-d", "0.4", "-o", "p")
    assert result.exit_code == 0, result.stderr
    assert "no CUDA GPU found" not in result.stderr
    assert any(line.startswith("loading ") and line.endswith(" on cuda…") for line in result.stderr.splitlines())


def test_each_failed_track_gives_one_error_line(workdir, run_cli):
    """A track that fails is reported once, in one ``error:`` line, by generate and by regenerate.

    The summary table at the end repeats the reason in the failed row's last column: that is the
    table's content (a batch's errors may have scrolled away by then), not a second error line.
    """
    assert run_cli("game_over", "-d", "0.3", "--seed", "4", "-o", "first").exit_code == 0
    full_disk = {"TYDUST_TEST_FAULT": "enospc:ogg", "COLUMNS": "300"}  # wide: table rows do not wrap
    result = run_cli("game_over", "menu_calm", "-d", "0.3", "-o", "out", env=full_disk)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    reasons = {name: f"could not write {name}.ogg: No space left on device" for name in ("game_over", "menu_calm")}
    assert [line for line in lines if line.startswith("error:")] == [f"error: {n}: {r}" for n, r in reasons.items()]
    for name, reason in reasons.items():
        mentions = [line for line in lines if reason in line]
        assert len(mentions) == 2, result.stderr  # the error line and the table row
        assert mentions[1].split()[:2] == [name, "failed"]

    again = run_cli("regenerate", "first/game_over.json", "-o", "again", model=False, env=full_disk)
    assert again.exit_code == 1
    assert [line for line in again.stderr.splitlines() if reasons["game_over"] in line] == [
        f"error: game_over: {reasons['game_over']}"
    ], again.stderr


def test_progress_bar_on_a_terminal(workdir, run_cli):
    result = run_cli("game_over", "-d", "0.4", "-o", "t", env={"FORCE_COLOR": "1", "COLUMNS": "120"})
    assert result.exit_code == 0
    assert "game_over" in result.stderr and "steps" in result.stderr and "23/23" in result.stderr


ERROR_CASES = [
    (["phase9"], 2, "no prompt file for track 'phase9'", "tracks in prompts/: game_over, menu_calm, phase3_combat, phase4_peak"),
    (["game_over", "-d", "0"], 2, "duration must be more than 0 seconds", None),
    (["game_over", "-d", "ninety"], 2, "duration 'ninety' is not a number", None),
    (["game_over", "-d", "100000"], 2, "above the maximum of 600 s", None),
    (["game_over", "-d", "nan"], 2, "duration must be a finite number", None),
    (["game_over", "--device", "tpu"], 2, "unknown device 'tpu'; use auto, cuda, cuda:N or cpu", None),
    (["game_over", "--seed", "-3"], 2, "seed must be between 0 and", None),
    (["game_over", "--top-p", "1.5"], 2, "top_p must be between 0.0 (off) and 1.0", None),
    (["game_over", "--window", "10", "--stride", "12"], 2, "stride (12 s) must be shorter than the window (10 s)", None),
    (["../etc/passwd"], 2, "track name '../etc/passwd' is not valid", None),
]


@pytest.mark.parametrize("args, code, message, extra", ERROR_CASES)
def test_bad_input_is_one_line_before_the_model_loads(workdir, run_cli, no_model_load, args, code, message, extra):
    result = run_cli(*args)
    assert result.exit_code == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    if extra:
        assert extra in lines[0]
    assert "Traceback" not in result.stderr
    assert not (workdir / "assets").exists()


def test_empty_prompt_file(workdir, run_cli, no_model_load):
    (workdir / "prompts/blank.txt").write_text("\n\n")
    result = run_cli("blank")
    assert result.exit_code == 2 and "blank.txt has an empty prompt" in result.stderr


def test_model_not_available_offline(workdir, run_cli, no_model_load):
    result = run_cli("game_over", "--model", "facebook/musicgen-small")
    assert result.exit_code == 3
    assert "not in the local Hugging Face cache" in result.stderr and "hf download facebook/musicgen-small" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_ffmpeg_missing(workdir, run_cli, no_model_load):
    result = run_cli("game_over", env={"TYDUST_FFMPEG": str(workdir / "no-ffmpeg")})
    assert result.exit_code == 3 and "does not run" in result.stderr


def test_ffmpeg_without_vorbis(workdir, run_cli, no_model_load):
    from tydust_gen.export.ffmpeg import find_ffmpeg

    real = find_ffmpeg().path
    script = workdir / "ffmpeg"
    script.write_text(f'#!/bin/sh\ncase "$*" in *-encoders*) echo " A..... libmp3lame x"; exit 0;; esac\nexec "{real}" "$@"\n')
    script.chmod(0o755)
    result = run_cli("game_over", env={"TYDUST_FFMPEG": str(script)})
    assert result.exit_code == 3 and "lacks the libvorbis encoder" in result.stderr


def test_unwritable_output_folder(workdir, run_cli, no_model_load):
    (workdir / "blocker").write_text("a file, not a folder")
    result = run_cli("game_over", "-o", "blocker/music")
    assert result.exit_code == 3 and "output folder blocker/music cannot be created" in result.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu(workdir, run_cli, no_model_load):
    result = run_cli("game_over", "--device", "cuda")
    assert result.exit_code == 3 and "no CUDA GPU is available" in result.stderr


def test_console_script_and_module_entry_points(workdir, tiny_model_dir):
    """The installed command and ``python -m`` behave like the in-process runner: real exit codes, one line."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "COLUMNS": "300"}
    helped = subprocess.run([sys.executable, "-m", "tydust_gen", "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and "generate" in helped.stdout
    gen_help = subprocess.run([sys.executable, "-m", "tydust_gen", "generate", "--help"], capture_output=True, text=True, env=env, cwd=workdir)
    assert "0.0 means OFF, not greedy" in " ".join(gen_help.stdout.split())
    bad = subprocess.run(
        [sys.executable, "-m", "tydust_gen", "game_over", "-d", "-5", "--model", str(tiny_model_dir)],
        capture_output=True, text=True, env=env, cwd=workdir,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "error: duration must be more than 0 seconds, got '-5'; e.g. --duration 90"
    ok = subprocess.run(
        [sys.executable, "-m", "tydust_gen", "game_over", "-d", "0.3", "--model", str(tiny_model_dir), "--json", "-q"],
        capture_output=True, text=True, env=env, cwd=workdir,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["tracks"][0]["files"][0]["bitrate_bps"] > 0


def test_fast_and_stock_backends_make_the_same_track(workdir, run_cli):
    """The default decode loop and transformers' generate give the same tokens, so the same audio."""

    for backend in ("fast", "stock"):
        result = run_cli("game_over", "-d", "1.3", "--window", "0.6", "--stride", "0.36", "--seed", "4",
                         "--backend", backend, "-o", backend, "--json")  # fmt: skip
        assert result.exit_code == 0, result.stderr
        assert json.loads(result.stdout)["tracks"][0]["settings"]["backend"] == backend
    fast = decode_audio(workdir / "fast/game_over.ogg")
    stock = decode_audio(workdir / "stock/game_over.ogg")
    assert fast.shape == stock.shape and (fast == stock).all()


def test_hub_id_loads_from_the_hf_cache_offline(workdir, tiny_model_dir, tmp_path):
    """`--model facebook/musicgen-small` with HF_HUB_OFFLINE=1 loads a snapshot from the HF cache layout,
    and the provenance record pins the snapshot's commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    home = tmp_path / "hf"
    repo = home / "hub" / "models--facebook--musicgen-small"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    # A real process: the hub library reads HF_HOME when it is imported, as it does for users.
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run(
        [sys.executable, "-m", "tydust_gen", "game_over", "-d", "0.4", "-o", "out", "--model", "facebook/musicgen-small", "-q"],
        capture_output=True, text=True, env=env, cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((workdir / "out/game_over.json").read_text())
    assert record["model"]["hub_id"] == "facebook/musicgen-small" and record["model"]["revision"] == commit
    check_ogg(workdir / "out/game_over.ogg", 0.4)
