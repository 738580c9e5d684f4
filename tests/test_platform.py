"""Portability and what a hard kill leaves: the package without POSIX calls, OS locks across processes,
stale staging folders, and the mode of published files.

Tests marked ``smoke`` are the short set ``.ci/run`` also runs on a second Python version.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, files_under
from test_faults import wait_for_marker

from tydust_gen.base import processes
from tydust_gen.export.staging import STAGING_PREFIX

PACKAGE = REPO / "src" / "tydust_gen"
TAKE = ["game_over.json", "game_over.mp3", "game_over.ogg"]
BUSY = (
    "error: track 'game_over' is being written by another tydust-gen (out/.game_over.lock is locked); "
    "wait for it to finish or use another --out-dir"
)


def env_for(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), "COLUMNS": "200", **extra}


def staging_left(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(STAGING_PREFIX)) if folder.exists() else []


def make_staging(out: Path, take: str, suffix: str, content: bytes = b"\xff\xfb partial") -> Path:
    """A staging folder as a killed run leaves it: partial MP3 and OGG inside."""
    folder = out / f"{STAGING_PREFIX}{take}-{suffix}"
    folder.mkdir(parents=True)
    (folder / f"{take}.mp3").write_bytes(content)
    (folder / f"{take}.ogg").write_bytes(b"OggS partial")
    return folder


# --- the package on a system without POSIX process and lock calls --------------------------

# Windows has none of these. Removing them before the package is imported makes any use of them,
# at import or while `doctor --selftest` renders a track, fail loudly here. Third-party libraries choose
# their POSIX or Windows code by sys.platform, which still says Linux here (torch names SIGKILL, the
# standard library's getpass uses pwd): they are loaded first, as they are, and never checked.
WITHOUT_POSIX = r"""
import os, signal, sys
import pydub, torch, transformers
from transformers import MusicgenForConditionalGeneration, MusicgenProcessor, T5Tokenizer
assert not [m for m in sys.modules if m.startswith("tydust_gen")]
for name in ("fcntl", "resource", "termios"):
    sys.modules[name] = None  # import raises ImportError
for module, names in ((os, ("killpg", "setsid", "getpgid", "setpgid", "fork")),
                      (signal, ("SIGKILL", "SIGHUP", "SIGQUIT", "pthread_sigmask"))):
    for name in names:
        if hasattr(module, name):
            delattr(module, name)
import importlib, pkgutil
import tydust_gen
modules = [m.name for m in pkgutil.walk_packages(tydust_gen.__path__, "tydust_gen.") if not m.name.endswith("__main__")]
for name in modules:
    importlib.import_module(name)
print("imported", len(modules), flush=True)
from tydust_gen.cli import app
sys.argv = ["tydust-gen", "doctor", "--selftest", "--json", "--model", sys.argv[1]]
app()
"""


@pytest.mark.smoke
def test_imports_and_doctor_without_posix_calls(workdir, tiny_model_dir):
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_POSIX, str(tiny_model_dir)],
        cwd=workdir, env=env_for(TYDUST_CPU_KERNEL="0"), capture_output=True, text=True,  # no kernel build: a smoke test
    )  # fmt: skip
    first, _, rest = proc.stdout.partition("\n")
    modules = [p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"]
    assert first == f"imported {len(modules) - 1}", proc.stderr  # every module but tydust_gen/__init__ itself
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = {c["name"]: c for c in json.loads(rest)["checks"]}
    assert checks["ffmpeg"]["ok"] and checks["model"]["ok"]
    assert checks["selftest"]["ok"] and "verified" in checks["selftest"]["detail"]  # a real render, ffmpeg included


# Names whose use is OS-specific process handling; only base/processes.py may use them.
PROCESS_ATTRS = {"killpg", "setsid", "getpgid", "setpgid", "SIGKILL", "CREATE_NEW_PROCESS_GROUP"}
PROCESS_KEYWORDS = {"start_new_session", "preexec_fn", "creationflags"}
POSIX_MODULES = {"fcntl", "resource", "termios", "pwd", "grp"}
ALLOWED = {"base/processes.py": PROCESS_ATTRS | PROCESS_KEYWORDS | {"/proc/meminfo", "import fcntl"}}  # the one module for OS specifics


def test_os_specific_process_handling_lives_in_one_module():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in PROCESS_ATTRS:
                name = node.attr
            elif isinstance(node, ast.keyword) and node.arg in PROCESS_KEYWORDS:
                name = node.arg
            elif isinstance(node, ast.Import) and {a.name for a in node.names} & POSIX_MODULES:
                name = "import " + ", ".join(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module in POSIX_MODULES:
                name = f"from {node.module}"
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("/proc/"):
                # /proc/cpuinfo names CPU features for the kernel cache key, with a fallback off Linux
                name = None if (rel, node.value) == ("model/cpu_kernel.py", "/proc/cpuinfo") else node.value
            else:
                continue
            if name is not None and name not in ALLOWED.get(rel, set()):
                found.append(f"{rel}:{node.lineno}: {name}")
    assert found == []


def test_new_process_group_on_each_system(monkeypatch):
    assert processes.new_group_options() == {"start_new_session": True}  # this POSIX system
    monkeypatch.delattr(os, "killpg")
    monkeypatch.delattr(os, "setsid")
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200, raising=False)
    assert processes.new_group_options() == {"creationflags": 0x200}  # Windows
    monkeypatch.delattr(subprocess, "CREATE_NEW_PROCESS_GROUP")
    assert processes.new_group_options() == {}  # neither: a plain child


def test_kill_tree_without_process_groups(monkeypatch):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.delattr(os, "killpg")  # (SIGKILL stays: Popen.kill sends it on this system)
    processes.kill_tree(child)  # falls back to Popen.kill, TerminateProcess on Windows
    assert child.poll() is not None


# --- OS locks across processes ------------------------------------------------------------

HOLDER = r"""
import sys
from pathlib import Path
from tydust_gen.runs.locks import TrackLocks
locks = TrackLocks()  # kept: filelock releases a lock its object no longer referenced
locks.acquire(Path(sys.argv[1]), sys.argv[2])
print("held", flush=True)
sys.stdin.read()  # until the test closes stdin (then release, as a finished run), or kills us
locks.release()
"""


def hold(out: Path, track: str) -> subprocess.Popen:
    """Another process holding ``track``'s lock in ``out`` (as a run between its lock and its end)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), track],
        env=env_for(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()
    assert line == "held\n", proc.stderr.read()
    return proc


def test_second_writer_exits_4_and_a_killed_holders_lock_is_free(workdir, run_cli):
    out = workdir / "out"
    holder = hold(out, "game_over")
    busy = run_cli("game_over", "-d", "0.3", "-o", "out")
    assert busy.exit_code == 4 and busy.stderr.strip() == BUSY
    holder.kill()  # SIGKILL: no cleanup runs in the holder
    holder.communicate()
    assert (out / ".game_over.lock").exists()  # the file stays; the OS dropped the lock
    done = run_cli("game_over", "-d", "0.3", "-o", "out")
    assert done.exit_code == 0, done.stderr
    assert files_under(out) == TAKE  # the lock file went with the run's release


def test_lock_held_in_another_process_is_busy_in_process(tmp_path):
    from tydust_gen.base.errors import TrackBusyError
    from tydust_gen.runs.locks import TrackLocks

    holder = hold(tmp_path, "battle")
    try:
        with TrackLocks() as locks, pytest.raises(TrackBusyError):
            locks.acquire(tmp_path, "battle")
        with TrackLocks() as locks:
            locks.acquire(tmp_path, "battle_v1")  # another track: free
    finally:
        holder.stdin.close()  # the holder finishes and releases
        holder.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    with TrackLocks() as locks:
        locks.acquire(tmp_path, "battle")


def test_a_track_named_like_a_take_of_a_running_batch_is_busy(workdir, run_cli):
    """`boss -n 2` writes boss_v2.*; a concurrent run of a track called boss_v2 (or of
    `regenerate out/boss_v2.json`) must not write the same files at the same time."""
    (workdir / "prompts/boss_v2.txt").write_text("calm synth\n")
    out = workdir / "out"
    holder = hold(out, "boss_v2")  # as `boss -n 2` holds it while it renders
    try:
        busy = run_cli("boss_v2", "-d", "0.3", "-o", "out")
        assert busy.exit_code == 4, busy.stderr
        assert "track 'boss_v2' is being written by another tydust-gen" in busy.stderr
    finally:
        holder.stdin.close()
        holder.wait()
    from tydust_gen.base.errors import TrackBusyError
    from tydust_gen.runs.locks import TrackLocks

    with TrackLocks() as mine:
        mine.acquire_takes(out, "boss", ("boss_v1", "boss_v2"))
        with TrackLocks() as other, pytest.raises(TrackBusyError):
            other.acquire(out, "boss_v2")


# --- stale staging folders ----------------------------------------------------------------


def test_run_sweeps_stale_staging_and_keeps_live_ones(workdir, run_cli, tmp_path):
    out = workdir / "out"
    live = hold(out, "menu_calm")  # a live run of menu_calm
    try:
        stale = [
            make_staging(out, "game_over", "k1lled00"),  # this track, killed earlier
            make_staging(out, "game_over_v2", "k1lled01"),  # a take of this track's earlier --variations run
            make_staging(out, "phase4_peak", "k1lled02"),  # another track nobody is writing
        ]
        kept = [
            make_staging(out, "menu_calm", "alive000"),  # menu_calm's writer is alive
            make_staging(out, "menu_calm_v3", "alive001"),  # a take of it
        ]
        elsewhere = tmp_path / "not-staging"
        elsewhere.mkdir()
        (elsewhere / "precious").write_text("keep")
        (out / f"{STAGING_PREFIX}evil-link0000").symlink_to(elsewhere, target_is_directory=True)
        before = {k: files_under(k) for k in kept}
        result = run_cli("game_over", "-d", "0.3", "-o", "out")
        assert result.exit_code == 0, result.stderr
        assert not any(s.exists() for s in stale)
        assert {k: files_under(k) for k in kept} == before
        assert (elsewhere / "precious").read_text() == "keep"  # links are never followed
        assert staging_left(out) == [f"{STAGING_PREFIX}evil-link0000", *sorted(k.name for k in kept)]
    finally:
        live.stdin.close()
        live.wait()


@pytest.fixture
def undeletable(tmp_path):
    """Make a folder that even root cannot empty (read-only; immutable where root ignores modes)."""
    made = []

    def make(folder: Path) -> None:
        folder.chmod(0o555)
        made.append(folder)
        if os.geteuid() == 0:
            if not shutil.which("chattr") or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
                pytest.skip("running as root without chattr +i: cannot make a folder that resists removal")

    yield make
    for folder in made:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def test_list_sweeps_and_reports_what_it_cannot_remove(workdir, run_cli, undeletable):
    out = workdir / "out"
    removable = make_staging(out, "phase4_peak", "k1lled00")
    stuck = make_staging(out, "game_over", "r3adonly")
    undeletable(stuck)
    result = run_cli("list", "-o", "out", "--json")
    assert result.exit_code == 0, result.stderr
    assert not removable.exists()
    leftovers = json.loads(result.stdout)["leftovers"]
    assert [(x["path"], x["take"]) for x in leftovers] == [(str(Path("out") / stuck.name), "game_over")]
    assert leftovers[0]["reason"] in ("Permission denied", "Operation not permitted")
    text = run_cli("list", "-o", "out")
    assert f"warning: {Path('out') / stuck.name} was left by a killed run of game_over and cannot be removed" in text.stderr


def test_sigkill_while_encoding_then_next_run_leaves_no_staging(workdir, run_cli, tiny_model_dir):
    out = workdir / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tydust_gen", "game_over", "-d", "0.6", "-o", "out", "--model", str(tiny_model_dir)],
        cwd=workdir, env=env_for(TYDUST_TEST_HOOK="encode"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for_marker(proc, "encode", timeout=120)  # the MP3 is staged, the OGG not yet
    proc.kill()
    proc.communicate()
    [left] = staging_left(out)
    assert (out / left / "game_over.mp3").stat().st_size > 0  # what the kill left: a partial take
    result = run_cli("game_over", "-d", "0.6", "-o", "out")
    assert result.exit_code == 0, result.stderr
    assert files_under(out) == TAKE  # no staging folder, no lock file


# --- modes of published files -------------------------------------------------------------


@pytest.mark.smoke
@pytest.mark.parametrize("umask", [0o027])
def test_published_files_get_the_umask_mode(workdir, run_cli, umask):
    pytest.importorskip("matplotlib")
    old = os.umask(umask)
    try:
        result = run_cli("game_over", "-d", "0.3", "-o", "out", "--preview", env={"TYDUST_CPU_KERNEL": "0"})
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.stderr
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (workdir / "out").iterdir()}
    assert modes == dict.fromkeys(["game_over.json", "game_over.mp3", "game_over.ogg", "game_over.png"], 0o666 & ~umask)


def _sleeper_pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it if it is our zombie, so a dead child does not count
        except ChildProcessError:
            pass
        if processes.is_alive(pid):
            alive.append(pid)
    return alive


def test_ctrl_c_while_a_child_starts_leaves_no_child(monkeypatch):
    """SIGINT right after the fork, still inside Popen.__init__ (seen: ffmpeg left writing after Ctrl-C)."""
    import signal

    import pydub.audio_segment as seg

    pids: list[int] = []
    real = subprocess.Popen._execute_child

    def started_then_interrupted(self, *args, **kwargs):
        real(self, *args, **kwargs)
        pids.append(self.pid)
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode: still in __init__

    monkeypatch.setattr(subprocess.Popen, "_execute_child", started_then_interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            with processes.reaped():
                seg.subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        assert len(pids) == 1
        assert _sleeper_pids_alive(pids) == [], "the child started as Ctrl-C came is still running"
    finally:
        for pid in _sleeper_pids_alive(pids):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
