"""Re-runnable batches, provenance records, regenerate, list, doctor, and hostile or odd input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, files_under

from tydust_gen.model import loading as engine

TAKE = ["game_over.json", "game_over.mp3", "game_over.ogg"]


def error_line(result) -> str:
    lines = [x for x in result.stderr.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# --- provenance ---------------------------------------------------------------------------


def test_record_says_how_the_take_was_made(workdir, run_cli, tiny_model_dir):
    result = run_cli("game_over", "-d", "0.4", "-o", "out", "--json")
    assert result.exit_code == 0, result.stderr
    assert files_under(workdir / "out") == TAKE
    track = json.loads(result.stdout)["tracks"][0]
    assert track["status"] == "ok" and track["provenance"] == str(Path("out/game_over.json"))
    rec = json.loads((workdir / "out/game_over.json").read_text())
    assert rec["format"] == "tydust-gen/provenance" and rec["track"] == "game_over"
    assert rec["prompt"]["text"].startswith("Short melancholic darkwave sting")
    import hashlib

    assert rec["prompt"]["file_sha256"] == hashlib.sha256((workdir / "prompts/game_over.txt").read_bytes()).hexdigest()
    assert rec["settings"]["seed"] == track["seed"] and rec["seed_was_random"] is True  # the random seed is recorded
    assert rec["settings"]["duration_s"] == 0.4 and rec["settings"]["sampling"]["top_k"] == 250
    assert rec["model"]["ref"] == str(tiny_model_dir) and len(rec["model"]["dir_sha256"]) == 64
    assert rec["device"] == "cpu" and rec["dtype"] == "float32"
    from tydust_gen.model import cpu_kernel

    assert rec["cpu_kernel"] == cpu_kernel.load().label  # "native" wherever a C++ compiler is (tests/test_cpu_kernel.py)
    assert set(rec["versions"]) >= {"tydust-gen", "torch", "torchaudio", "transformers", "pydub", "mutagen", "ffmpeg"}
    assert rec["versions"]["ffmpeg"].startswith("ffmpeg version")
    assert set(rec["timings_s"]) >= {"generate", "decode", "audio", "master_export", "total"}
    for f in rec["files"]:
        path = workdir / "out" / f["path"]
        assert f["size_bytes"] == path.stat().st_size
        assert f["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert f["bitrate_bps"] == 192_000 and abs(f["duration_s"] - 0.4) < 0.05
    assert rec["result"]["steps"] == 23 and rec["take"] == "game_over" and rec["result"]["take"] == 1


def test_regenerate_from_record_gives_the_same_audio(workdir, run_cli):
    assert run_cli("game_over", "-d", "0.4", "-o", "out").exit_code == 0
    result = run_cli("regenerate", "out/game_over.json", "-o", "again", "--json", model=False)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["comparison"] == {"mp3": "identical", "ogg": "same audio"}
    assert "game_over.mp3: identical to the recorded take" in result.stderr
    old = json.loads((workdir / "out/game_over.json").read_text())
    new = json.loads((workdir / "again/game_over.json").read_text())
    assert old["files"][0]["sha256"] == new["files"][0]["sha256"] and old["settings"] == new["settings"]
    # in place it needs --force, like generate
    refused = run_cli("regenerate", "out/game_over.json", model=False)
    assert refused.exit_code == 2
    assert error_line(refused) == (
        f"error: {Path('out/game_over.mp3')} already exists; pass --out-dir DIR to regenerate elsewhere, or --force to replace it"
    )


def test_regenerate_rejects_a_foreign_json(workdir, run_cli, no_model_load):
    (workdir / "x.json").write_text('{"hello": 1}')
    result = run_cli("regenerate", "x.json", model=False)
    assert result.exit_code == 2 and error_line(result) == "error: x.json is not a tydust-gen provenance record"


# --- re-runnable batches ------------------------------------------------------------------


def test_skip_existing_skips_current_takes_only(workdir, run_cli, monkeypatch):
    assert run_cli("game_over", "-d", "0.4", "-o", "out", "--seed", "1").exit_code == 0
    before = {p.name: p.read_bytes() for p in (workdir / "out").iterdir()}
    loads = []
    real = engine.load_model
    monkeypatch.setattr(engine, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    # same inputs: skipped without even loading the model (random seed: any recorded seed matches)
    again = run_cli("game_over", "-d", "0.4", "-o", "out", "--skip-existing", "--json")
    assert again.exit_code == 0 and loads == []
    assert json.loads(again.stdout)["tracks"][0]["status"] == "skipped"
    assert "skipped" in again.stderr and {p.name: p.read_bytes() for p in (workdir / "out").iterdir()} == before
    # another duration: not current, refused without --force
    changed = run_cli("game_over", "-d", "0.5", "-o", "out", "--skip-existing")
    assert changed.exit_code == 2
    assert error_line(changed) == (
        f"error: {Path('out/game_over.mp3')} exists but is not current (settings differ (duration_s)); pass --force to replace it"
    )
    # a changed file on disk is not current either
    (workdir / "out/game_over.ogg").write_bytes(b"edited")
    edited = run_cli("game_over", "-d", "0.4", "-o", "out", "--skip-existing")
    assert "game_over.ogg changed since it was recorded" in error_line(edited)
    # mixed batch: one skipped, one made, one table
    mixed = run_cli("game_over", "menu_calm", "-d", "0.4", "-o", "out", "--skip-existing", "--force", "--json")
    assert mixed.exit_code == 0
    assert [t["status"] for t in json.loads(mixed.stdout)["tracks"]] == ["ok", "ok"]
    assert "status" in mixed.stderr and "menu_calm.mp3, menu_calm.ogg" in mixed.stderr


def test_all_tracks_and_failed_track_exit_code(workdir, run_cli, monkeypatch):
    for name in ("phase3_combat", "phase4_peak", "menu_calm"):
        (workdir / f"prompts/{name}.toml").unlink()
    (workdir / "prompts/second.txt").write_text("calm synth")
    from tydust_gen.runs import batch

    real = batch.render_takes

    def flaky(loaded, plan, **kw):
        if plan.spec.name == "game_over":
            from tydust_gen.base.errors import GenerationError

            raise GenerationError("simulated failure")
        return real(loaded, plan, **kw)

    monkeypatch.setattr(batch, "render_takes", flaky)
    result = run_cli("--all", "-d", "0.3", "-o", "out", "--json")
    assert result.exit_code == 1
    tracks = json.loads(result.stdout)["tracks"]
    assert [(t["track"], t["status"]) for t in tracks] == [("game_over", "failed"), ("second", "ok")]
    assert "error: game_over: simulated failure" in result.stderr.splitlines()
    assert files_under(workdir / "out") == ["second.json", "second.mp3", "second.ogg"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--all", "game_over"], "error: name tracks or pass --all, not both"),
        ([], "error: name at least one track (e.g. tydust-gen phase4_peak) or pass --all"),
    ],
)
def test_all_usage_errors(workdir, run_cli, no_model_load, args, message):
    result = run_cli("generate", *args)
    assert result.exit_code == 2 and error_line(result) == message


def test_list_shows_current_and_stale(workdir, run_cli):
    (workdir / "prompts/menu_calm.toml").write_text('prompt = "calm synth"\nduration = 0.3\nseed = 4\n')
    assert run_cli("menu_calm", "-o", "out").exit_code == 0
    (workdir / "out/game_over.mp3").write_bytes(b"foreign")
    result = run_cli("list", "-o", "out", "--json")
    assert result.exit_code == 0, result.stderr
    rows = {t["name"]: t for t in json.loads(result.stdout)["tracks"]}
    assert rows["menu_calm"]["status"] == "current" and rows["menu_calm"]["duration_s"] == 0.3
    assert rows["game_over"]["status"] == "no record" and rows["game_over"]["duration_s"] == 30.0
    assert rows["phase4_peak"]["status"] == "missing" and rows["phase4_peak"]["duration_s"] == 90.0
    (workdir / "prompts/menu_calm.toml").write_text('prompt = "calm synth, brighter"\nduration = 0.3\nseed = 4\n')
    rows = {t["name"]: t for t in json.loads(run_cli("list", "-o", "out", "--json").stdout)["tracks"]}
    assert rows["menu_calm"]["status"] == "stale" and rows["menu_calm"]["detail"] == "the prompt file changed"


def test_doctor_and_selftest(workdir, run_cli, tiny_model_dir, private_tmp):
    result = run_cli("doctor", "--selftest", "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["ffmpeg"]["ok"] and "libmp3lame" in checks["ffmpeg"]["detail"]
    assert checks["selftest"]["ok"] and "verified" in checks["selftest"]["detail"]
    assert checks["model"]["ok"] and str(tiny_model_dir) in checks["model"]["detail"]
    assert list(private_tmp.iterdir()) == []  # the self-test cleaned up
    missing = run_cli("doctor", "--model", "facebook/musicgen-small", "--json", model=False)
    assert missing.exit_code == 3
    model = {c["name"]: c for c in json.loads(missing.stdout)["checks"]}["model"]
    assert not model["ok"] and model["required"] and "not in the local Hugging Face cache" in model["detail"]


def test_doctor_without_ffmpeg(workdir, run_cli):
    result = run_cli("doctor", env={"TYDUST_FFMPEG": str(workdir / "none")})
    assert result.exit_code == 3 and "FAIL" in result.stderr and "does not run" in result.stderr


# --- hostile or odd input -----------------------------------------------------------------

BAD_DURATIONS = [
    ("nan", "error: duration must be a finite number, got 'nan'"),
    ("inf", "error: duration must be a finite number, got 'inf'"),
    ("1e9", "error: duration '1e9' is above the maximum of 600 s; generate shorter tracks"),
    ("-0", "error: duration must be more than 0 seconds, got '-0'; e.g. --duration 90"),
    ("0.01", "error: duration '0.01' is too short; the minimum is 0.1 s"),
]


@pytest.mark.parametrize("value, message", BAD_DURATIONS)
def test_bad_durations(workdir, run_cli, no_model_load, value, message):
    result = run_cli("game_over", "-o", "out", f"--duration={value}")
    assert result.exit_code == 2 and error_line(result) == message
    assert not (workdir / "out").exists()


def test_nul_in_track_name(workdir, run_cli, no_model_load):
    result = run_cli("game\x00over")
    assert result.exit_code == 2
    assert error_line(result) == "error: track name 'game\\x00over' is not valid: use letters, digits, '_', '-' and '.', e.g. phase4_peak"


def test_hostile_names_through_the_real_command(workdir, tiny_model_dir):
    """Long and escaping names via a real process (argv cannot carry NUL at all: the OS refuses it)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    for name in ["x" * 300, "../x", "/etc/passwd", "-"]:
        proc = subprocess.run(
            [sys.executable, "-m", "tydust_gen", "generate", "--model", str(tiny_model_dir), "--", name],
            cwd=workdir, env=env, capture_output=True, text=True,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip() == f"error: track name {name!r} is not valid: use letters, digits, '_', '-' and '.', e.g. phase4_peak"
    with pytest.raises(ValueError, match="embedded null byte"):
        subprocess.run([sys.executable, "-c", "pass", "a\x00b"])
    assert not (workdir / "assets").exists()


def test_odd_prompt_files(workdir, run_cli, no_model_load, tmp_path):
    p = workdir / "prompts"
    (p / "latin1.txt").write_bytes("caf\xe9 music".encode("latin-1"))
    (p / "blank.toml").write_text('prompt = "   "\n')
    (p / "folder.toml").mkdir()
    (p / "dangling.txt").symlink_to(tmp_path / "nowhere.txt")
    cases = {
        "latin1": f"error: {Path('prompts/latin1.txt')} is not UTF-8 text (byte 3); save it as UTF-8",
        "blank": f"error: {Path('prompts/blank.toml')} has an empty prompt; write a description of the music in it",
        "folder": f"error: {Path('prompts/folder.toml')} is not a regular file",
        "dangling": f"error: {Path('prompts/dangling.txt')} is a broken symbolic link; point it at a prompt file or remove it",
    }
    for name, message in cases.items():
        result = run_cli(name, "-o", "out")
        assert result.exit_code == 2 and error_line(result) == message, name
    assert not (workdir / "out").exists()


def test_prompt_symlink_outside_the_folder_is_followed(workdir, run_cli, tmp_path):
    shared = tmp_path / "shared-prompts"
    shared.mkdir()
    (shared / "theme.txt").write_text("calm synth menu music")
    (workdir / "prompts/theme.txt").symlink_to(shared / "theme.txt")
    result = run_cli("theme", "-d", "0.3", "-o", "out")
    assert result.exit_code == 0, result.stderr
    assert files_under(workdir / "out") == ["theme.json", "theme.mp3", "theme.ogg"]


def test_enormous_prompt_is_refused_not_truncated(workdir, run_cli):
    (workdir / "prompts/huge.txt").write_text("dark synth " * 400)
    result = run_cli("huge", "game_over", "-d", "0.3", "-o", "out")
    assert result.exit_code == 2
    assert error_line(result) == (
        f"error: the prompt of 'huge' is 801 tokens long but the model reads at most 512; "
        f"shorten {Path('prompts/huge.txt')} (it would be cut off)"
    )
    assert not (workdir / "out").exists()  # refused before any track generated; lock folder removed


# --- two tracks, one output -----------------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True])
def test_two_tracks_that_would_write_the_same_take_are_refused_before_anything(workdir, run_cli, no_model_load, force):
    """boss with 2 variations writes boss_v2.*, as does a track called boss_v2: with --force the second
    would have replaced the first's take in the same run."""
    (workdir / "prompts/boss.toml").write_text('prompt = "dark synth"\nvariations = 2\n')
    (workdir / "prompts/boss_v2.txt").write_text("calm synth\n")
    result = run_cli("boss", "boss_v2", "-o", "out", *(["--force"] if force else []))
    assert result.exit_code == 2
    assert error_line(result) == (
        f"error: tracks 'boss' and 'boss_v2' would both write {Path('out/boss_v2.mp3')}; "
        "rename one of them or give them different folders"
    )
    assert not (workdir / "out").exists()


def test_a_track_listed_twice_is_refused(workdir, run_cli, no_model_load):
    result = run_cli("game_over", "game_over", "-o", "out")
    assert result.exit_code == 2
    assert error_line(result) == "error: track 'game_over' is listed twice; name each track once"
