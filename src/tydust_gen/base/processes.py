"""ffmpeg child processes that die with us.

pydub runs ffmpeg with ``subprocess.Popen(...).communicate()``. If SIGTERM or
Ctrl-C interrupts that wait, Python unwinds but the child would keep running
and write into a staging folder being removed. :func:`reaped` runs pydub's
children in their own session (so a terminal's Ctrl-C reaches only us and we
decide) and kills their whole process group when the block exits with an
exception.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Iterator


class _Tracked(subprocess.Popen):
    live: list["_Tracked"] = []

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("start_new_session", True)
        super().__init__(*args, **kwargs)
        _Tracked.live.append(self)


class _SubprocessShim:
    """Stands in for the ``subprocess`` module inside pydub; only ``Popen`` differs."""

    Popen = _Tracked

    def __getattr__(self, name):
        return getattr(subprocess, name)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.kill()
    with contextlib.suppress(Exception):
        proc.wait(timeout=5)


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
        for proc in _Tracked.live[start:]:
            _kill(proc)
        raise
    finally:
        seg.subprocess = saved
        del _Tracked.live[start:]
