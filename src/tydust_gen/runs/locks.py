"""One writer per track: an advisory lock file beside the outputs.

Before the model loads, every track of a run takes ``OUT_DIR/.NAME.lock`` with
``fcntl.flock(LOCK_EX | LOCK_NB)``. A second tydust-gen writing the same track
fails at once with :class:`TrackBusyError` (exit code 4). The lock file is
removed on release; if a process is killed with SIGKILL the file stays, but it
is harmless: the kernel drops the lock with the process, and the next run
takes it. Taking the lock checks that the file it locked is still the one at
the path, so unlinking on release cannot let two writers in.

Output folders that did not exist are created for the lock and removed again
on release when they are still empty.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

from tydust_gen.base.errors import TrackBusyError
from tydust_gen.base.signals import deferred as signals_deferred
from tydust_gen.export.staging import make_output_dir

LOCK_SUFFIX = ".lock"


def lock_path(out_dir: Path, name: str) -> Path:
    """``OUT_DIR/.NAME.lock``."""
    return out_dir / f".{name}{LOCK_SUFFIX}"


@dataclass
class TrackLocks:
    """Locks held by this process; :meth:`release` drops them all."""

    held: list[tuple[Path, int]] = field(default_factory=list)
    created_dirs: list[Path] = field(default_factory=list)

    def acquire(self, out_dir: Path, name: str) -> Path:
        """Lock track ``name`` in ``out_dir`` (creating the folder if needed).

        Raises:
            TrackBusyError: another process holds it.
            OutputDirError: the folder cannot be created.
        """
        missing = []
        probe = out_dir
        while not probe.exists() and probe.parent != probe:
            missing.append(probe)
            probe = probe.parent
        make_output_dir(out_dir)
        self.created_dirs.extend(missing)
        path = lock_path(out_dir, name)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise TrackBusyError(
                        f"track {name!r} is being written by another tydust-gen ({path} is locked); "
                        f"wait for it to finish or use another --out-dir"
                    ) from None
                raise
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.held.append((path, fd))
                return path
            os.close(fd)  # the holder removed it between our open and flock: take the new one

    def release(self) -> None:
        """Remove and unlock every lock file, then remove folders created for them if empty."""
        while self.held:
            path, fd = self.held.pop()
            with contextlib.suppress(OSError):
                os.unlink(path)
            with contextlib.suppress(OSError):
                os.close(fd)
        for folder in sorted(set(self.created_dirs), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()
        self.created_dirs.clear()

    def __enter__(self) -> "TrackLocks":
        return self

    def __exit__(self, *exc) -> None:
        with signals_deferred():  # a second Ctrl-C must not strand a lock file
            self.release()
