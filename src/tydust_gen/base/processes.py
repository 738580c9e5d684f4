"""ffmpeg child processes that die with us, and every OS difference in handling them.

pydub runs ffmpeg with ``subprocess.Popen(...).communicate()``. If SIGTERM or
Ctrl-C interrupts that wait, Python unwinds but the child would keep running
and write into a staging folder being removed. :func:`reaped` runs pydub's
children in their own process group (so a terminal's Ctrl-C reaches only us
and we decide) and kills them when the block exits with an exception.

This module is the one place that knows how process groups differ between
systems; nothing else in the package calls ``os.killpg`` or names ``SIGKILL``:

* POSIX (Linux, macOS): the child starts a new session (``setsid``), so its
  process group id is its pid; :func:`kill_tree` sends SIGKILL to that group,
  which also ends anything ffmpeg itself started.
* Windows: the child gets ``CREATE_NEW_PROCESS_GROUP`` (the console's Ctrl-C
  then does not reach it) and :func:`kill_tree` ends it with
  ``TerminateProcess`` (``Popen.kill``). ffmpeg starts no children of its own
  there, so the process is the whole tree.

Each branch is chosen by what the running Python offers (``os.killpg``,
``signal.SIGKILL``, ``subprocess.CREATE_NEW_PROCESS_GROUP``), not by the
platform's name, so a system lacking one of them still imports and runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from tydust_gen.base import signals

KILL_WAIT_S = 5.0  # seconds to wait for a killed child to be reaped


def _has_process_groups() -> bool:
    """POSIX process groups: a new session at start, SIGKILL to the group at the end."""
    return hasattr(os, "setsid") and hasattr(os, "killpg") and hasattr(signal, "SIGKILL")


def new_group_options() -> dict[str, Any]:
    """``Popen`` keyword arguments that start a child in its own process group, on this system."""
    if _has_process_groups():
        return {"start_new_session": True}
    flag = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)  # Windows only
    return {"creationflags": flag} if flag else {}


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill ``proc`` (and, where the system has process groups, its group) and reap it; never raises."""
    if proc.poll() is not None:
        return
    if _has_process_groups():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.kill()  # SIGKILL on POSIX, TerminateProcess on Windows
    with contextlib.suppress(Exception):
        proc.wait(timeout=KILL_WAIT_S)


def is_alive(pid: int) -> bool:
    """Whether a process with this id exists (one we may not signal counts as alive)."""
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def available_memory_bytes() -> int | None:
    """Memory this machine can give a new allocation without swapping: Linux's MemAvailable, else the
    free physical pages (other POSIX systems), else None (Windows: unknown, so nothing is refused)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


BACKGROUND_NICE = 10  # niceness added to a thread whose work should yield the CPU to its siblings


_background = threading.local()


def run_in_background() -> None:
    """Lower the calling thread's priority by :data:`BACKGROUND_NICE` (up to 19), once per thread.

    Linux gives each thread its own niceness and a child process starts with its creator
    thread's, so ffmpeg processes this thread starts yield too. Elsewhere (no per-thread
    niceness, or not allowed) nothing changes. The priority cannot be raised back without
    privileges: call it only in a thread that ends with its work (a pool made for one call).
    """
    if getattr(_background, "lowered", False):
        return
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BACKGROUND_NICE))
        _background.lowered = True


def release_free_memory() -> bool:
    """Hand memory the process has freed back to the system (glibc's ``malloc_trim``); False elsewhere.

    glibc keeps freed blocks of a few MB (the decoder's per-window caches) in its heap for reuse, so a
    stage that follows a large one starts from the large one's high-water mark: without this, EnCodec
    decoding of a 35 s track began 0.45 GiB above the loaded model. Cheap (milliseconds).
    """
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):  # not glibc: nothing to trim this way
        return False


def widen_pipe(pipe: Any, size: int) -> None:
    """Ask for a pipe buffer of ``size`` bytes (Linux ``F_SETPIPE_SZ``), so a child writing into it can run
    ahead of a reader busy with what it read; elsewhere, or when refused, the default (64 KB) stays."""
    with contextlib.suppress(ImportError, AttributeError, OSError):
        import fcntl

        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, size)


def kill_self_now() -> None:
    """End this process at once, as the kernel's OOM killer or ``kill -9`` would (a test hook's tool)."""
    os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


class _Tracked(subprocess.Popen):
    """A child that :func:`reaped` can kill: tracked from the moment it exists.

    Ctrl-C in the main thread raises ``KeyboardInterrupt`` at the next bytecode,
    which can be inside ``Popen.__init__`` after the fork: the child then runs
    but the caller never gets its ``Popen``, and nothing would kill it (ffmpeg
    went on writing into a staging folder, seen in 4 of 300 interrupted runs).
    So the start and the tracking happen with SIGINT/SIGTERM held
    (:func:`signals.deferred`), and under a lock that :func:`reaped`'s cleanup
    takes too, so a child another thread is starting is killed with the rest.
    """

    live: list["_Tracked"] = []
    lock = threading.Lock()

    def __init__(self, *args, **kwargs):
        for key, value in new_group_options().items():
            kwargs.setdefault(key, value)
        with signals.deferred(), _Tracked.lock:
            super().__init__(*args, **kwargs)
            _Tracked.live.append(self)
        hook = getattr(_start_hooks, "hook", None)
        if hook is not None:
            hook(self)


_start_hooks = threading.local()


@contextlib.contextmanager
def on_start(hook: Callable[[subprocess.Popen], None] | None) -> Iterator[None]:
    """Inside the block, ``hook(child)`` runs as soon as this thread starts a child under :func:`reaped`
    (pydub's ffmpeg; ``child.args`` is its command line). The hook must return quickly and never raise.
    ``None``: no hook. Other threads' children are not reported (each encoding thread has its own)."""
    saved = getattr(_start_hooks, "hook", None)
    _start_hooks.hook = hook
    try:
        yield
    finally:
        _start_hooks.hook = saved


class _SubprocessShim:
    """Stands in for the ``subprocess`` module inside pydub; only ``Popen`` differs."""

    Popen = _Tracked

    def __getattr__(self, name):
        return getattr(subprocess, name)


@contextlib.contextmanager
def reaped() -> Iterator[None]:
    """Track the ffmpeg processes pydub starts in this block; kill them if the block fails."""
    import pydub.audio_segment as seg

    saved = seg.subprocess
    seg.subprocess = _SubprocessShim()
    start = len(_Tracked.live)
    try:
        yield
    except BaseException:
        with _Tracked.lock:
            started = _Tracked.live[start:]
        for proc in started:
            kill_tree(proc)
        raise
    finally:
        seg.subprocess = saved
        with _Tracked.lock:
            del _Tracked.live[start:]
