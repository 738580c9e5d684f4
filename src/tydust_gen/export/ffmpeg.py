"""Finding ffmpeg and checking it has our encoders.

ffmpeg is ``$TYDUST_FFMPEG`` when set, else the system's on PATH, else the
binary shipped in the ``imageio-ffmpeg`` wheel (no apt step). That wheel has no
ffprobe, so outputs are verified by reading them back (:mod:`.verify`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from dataclasses import dataclass

from tydust_gen.base.errors import FfmpegError

REQUIRED_ENCODERS = ("libmp3lame", "libvorbis")


FFMPEG_ENV = "TYDUST_FFMPEG"


@dataclass(frozen=True)
class Ffmpeg:
    """A usable ffmpeg.

    Attributes:
        path: executable.
        source: "TYDUST_FFMPEG", "system" or "imageio-ffmpeg".
        version: first line of ``ffmpeg -version``.
    """

    path: str
    source: str
    version: str


def _version(path: str) -> str:
    proc = subprocess.run([path, "-hide_banner", "-version"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise OSError(proc.stderr.strip() or f"exit {proc.returncode}")
    return (proc.stdout.splitlines() or ["ffmpeg"])[0].strip()


def find_ffmpeg() -> Ffmpeg:
    """Locate ffmpeg: ``$TYDUST_FFMPEG``, then PATH, then the imageio-ffmpeg wheel.

    Raises:
        FfmpegError: none runs.
    """
    override = os.environ.get(FFMPEG_ENV)
    if override:
        try:
            return Ffmpeg(override, FFMPEG_ENV, _version(override))
        except (OSError, subprocess.SubprocessError) as exc:
            raise FfmpegError(f"{FFMPEG_ENV}={override} does not run ({exc}); fix the path or unset it") from None
    system = shutil.which("ffmpeg")
    if system:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return Ffmpeg(system, "system", _version(system))
    try:
        import imageio_ffmpeg

        bundled = imageio_ffmpeg.get_ffmpeg_exe()
        return Ffmpeg(bundled, "imageio-ffmpeg", _version(bundled))
    except Exception:  # noqa: BLE001 - any failure here means "no bundled ffmpeg"
        pass
    raise FfmpegError("ffmpeg not found; install tydust-gen with its dependencies (pip install imageio-ffmpeg) or put ffmpeg on PATH")


def check_encoders(ffmpeg: Ffmpeg) -> None:
    """Fail fast unless ffmpeg has libmp3lame and libvorbis.

    Raises:
        FfmpegError: an encoder is missing (names it).
    """
    try:
        proc = subprocess.run([ffmpeg.path, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise FfmpegError(f"could not list ffmpeg's encoders ({exc})") from None
    names = {line.split()[1] for line in proc.stdout.splitlines() if len(line.split()) > 1}
    missing = [e for e in REQUIRED_ENCODERS if e not in names]
    if missing:
        raise FfmpegError(
            f"ffmpeg at {ffmpeg.path} lacks the {', '.join(missing)} encoder; "
            f"use one built with it (pip install imageio-ffmpeg, or set {FFMPEG_ENV})"
        )
