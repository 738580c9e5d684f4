"""One writer per track: an OS file lock beside the outputs, and the sweep of what dead writers left.

Before the model loads, every track of a run takes ``OUT_DIR/.NAME.lock``. It
is the operating system's own lock, through filelock: ``flock`` on Linux and
macOS (``UnixFileLock``), ``LockFileEx`` on Windows (``WindowsFileLock``). The
OS drops it when the holder dies, however it dies (SIGKILL, TerminateProcess),
so a killed run never leaves a track locked. A second tydust-gen writing the
same track fails at once with :class:`TrackBusyError` (exit code 4). filelock's
soft lock (a marker file whose presence is the lock) is never used: a killed
holder would leave it taken. On a file system without OS locks, taking the
lock fails with :class:`OutputDirError`.

The lock file is removed on release, while it is still locked: a process that
opened it just before finds an unlinked file once it gets the lock, which
filelock detects, and tries again on the path. A SIGKILLed holder leaves the
file behind, which is harmless: the next run takes it and removes it.

Output folders that did not exist are created for the lock and removed again
on release when they are still empty.

Stale staging folders. A run killed while encoding leaves its staging folder
(``.tydust-staging-TAKE-XXXXXXXX``, partial MP3/OGG inside; see
``export/staging.py``). Writers create a staging folder only while they hold
the lock of the track that owns the take, and remove it before they release
that lock. So the rule is: **a staging folder is stale when no live process
holds the lock of any track that could own its take** (``TAKE`` itself and,
for ``TRACK_vN``, ``TRACK``). Right after :meth:`TrackLocks.acquire` takes a
track's lock it sweeps the whole output folder (:func:`sweep_staging`): every
stale staging folder goes, whichever track it belongs to; folders of tracks
that a live process (this one included) is writing stay. ``tydust-gen list``
runs the same sweep and reports the folders it could not remove.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import filelock

from tydust_gen.base.errors import OutputDirError, TrackBusyError
from tydust_gen.base.signals import deferred as signals_deferred
from tydust_gen.base.variations import VARIATION_SUFFIX
from tydust_gen.export.staging import make_output_dir, staging_folders

LOCK_SUFFIX = ".lock"
# A holder that removes its lock file as we lock it leaves us an unlinked file: try the path this many
# times (no waiting; a live holder keeps its file locked, so a busy track fails every try).
LOCK_ATTEMPTS = 3
_VARIATION_TAKE = re.compile(rf"(.+){re.escape(VARIATION_SUFFIX)}\d+")


def lock_path(out_dir: Path, name: str) -> Path:
    """``OUT_DIR/.NAME.lock``."""
    return out_dir / f".{name}{LOCK_SUFFIX}"


def _os_lock(path: Path) -> filelock.BaseFileLock:
    """The OS lock for ``path``: never the soft fallback, which a killed holder leaves taken."""
    cls = filelock.WindowsFileLock if sys.platform == "win32" else filelock.UnixFileLock
    return cls(path, blocking=False, thread_local=False, fallback_to_soft=False)


def _try_lock(path: Path) -> filelock.BaseFileLock | None:
    """Take the OS lock on ``path`` without waiting; None when another process holds it.

    Raises:
        OutputDirError: the file cannot be locked at all (no OS locks on that file system, no permission).
    """
    for _ in range(LOCK_ATTEMPTS):
        lock = _os_lock(path)
        try:
            lock.acquire()
        except filelock.Timeout:
            continue  # held; or its holder removed it between our open and lock: look at the path again
        except OSError as exc:
            raise OutputDirError(
                f"cannot lock {path}: {exc.strerror or exc}; the output folder must be on a local disk "
                f"(or a share with file locking), pick another --out-dir"
            ) from None
        return lock
    return None


def _unlock(path: Path, lock: filelock.BaseFileLock) -> None:
    # Unlinking while locked: whoever opened the old file finds it unlinked once it locks it.
    # (Windows refuses while the file is open; its filelock removes it after closing.)
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):
        lock.release()


@dataclass(frozen=True)
class Leftover:
    """A stale staging folder the sweep could not remove.

    Attributes:
        path: the folder.
        take: the take it was building.
        reason: the operating system's reason (e.g. "Permission denied").
    """

    path: Path
    take: str
    reason: str


def _owners(take: str) -> set[str]:
    """Tracks whose run could have been building ``take``: itself, and TRACK for TRACK_vN."""
    owners = {take}
    match = _VARIATION_TAKE.fullmatch(take)
    if match:
        owners.add(match.group(1))
    return owners


def _track_is_free(out_dir: Path, track: str) -> bool:
    """No live process holds ``track``'s lock (checked by taking it for a moment)."""
    path = lock_path(out_dir, track)
    if not path.exists():
        return True  # a holder keeps its lock file until it releases
    try:
        lock = _try_lock(path)
    except OutputDirError:
        return False  # cannot tell: keep the folder
    if lock is None:
        return False
    _unlock(path, lock)  # also removes a lock file a killed holder left
    return True


def sweep_staging(out_dir: Path, *, mine: dict[str, bool] | None = None) -> list[Leftover]:
    """Remove the stale staging folders in ``out_dir`` (see the module docstring for the rule).

    Args:
        out_dir: the output folder; a missing folder has nothing to sweep.
        mine: locks this process holds in ``out_dir``, track name → whether its
            staging folders are stale (True for a track whose lock was just
            taken, so none of its folders can be ours; False for tracks that
            this process may be writing).

    Returns:
        The stale folders that could not be removed, with the reason.
    """
    mine = mine or {}
    leftovers = []
    for folder, take in staging_folders(out_dir):  # listed first: a folder made after this is never judged
        owners = _owners(take)
        if not all(mine[t] if t in mine else _track_is_free(out_dir, t) for t in owners):
            continue
        try:
            shutil.rmtree(folder)  # if interrupted half way, the rest is still stale for the next sweep
        except FileNotFoundError:
            continue  # its writer finished and removed it meanwhile
        except OSError as exc:
            leftovers.append(Leftover(folder, take, exc.strerror or str(exc)))
    return leftovers


@dataclass
class TrackLocks:
    """Locks held by this process; :meth:`release` drops them all."""

    held: list[tuple[Path, filelock.BaseFileLock]] = field(default_factory=list)
    created_dirs: list[Path] = field(default_factory=list)

    def acquire(self, out_dir: Path, name: str) -> Path:
        """Lock track ``name`` in ``out_dir`` (creating the folder if needed), then sweep stale staging folders there.

        Call it for every track of a run before any of them writes: the sweep
        takes the folders of the track just locked as stale.

        Raises:
            TrackBusyError: another process holds it.
            OutputDirError: the folder cannot be created, or the file system has no file locks.
        """
        missing = []
        probe = out_dir
        while not probe.exists() and probe.parent != probe:
            missing.append(probe)
            probe = probe.parent
        make_output_dir(out_dir)
        self.created_dirs.extend(missing)
        path = lock_path(out_dir, name)
        lock = _try_lock(path)
        if lock is None:
            raise TrackBusyError(
                f"track {name!r} is being written by another tydust-gen ({path} is locked); "
                f"wait for it to finish or use another --out-dir"
            )
        self.held.append((path, lock))
        mine = {p.name[1 : -len(LOCK_SUFFIX)]: p == path for p, _ in self.held if p.parent == out_dir}
        sweep_staging(out_dir, mine=mine)
        return path

    def acquire_takes(self, out_dir: Path, track: str, takes: tuple[str, ...] | list[str]) -> None:
        """Lock ``track`` and every take it writes (``TRACK_v2``...), so that another run of a track
        named like one of the takes (or of ``regenerate`` for one take) cannot write the same files.

        Raises:
            TrackBusyError, OutputDirError: as :meth:`acquire`.
        """
        for name in dict.fromkeys([track, *takes]):
            self.acquire(out_dir, name)

    def release(self) -> None:
        """Remove and unlock every lock file, then remove folders created for them if empty."""
        while self.held:
            _unlock(*self.held.pop())
        for folder in sorted(set(self.created_dirs), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()
        self.created_dirs.clear()

    def __enter__(self) -> "TrackLocks":
        return self

    def __exit__(self, *exc) -> None:
        with signals_deferred():  # a second Ctrl-C must not strand a lock file
            self.release()
