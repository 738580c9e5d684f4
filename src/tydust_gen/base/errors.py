"""The one exception hierarchy of the core, and the exit code each class maps to.

Every message is written for the person at the terminal: what went wrong and
what to do about it, on one line. The CLI prints ``str(error)`` and exits with
``error.exit_code``; nothing in the core exits or prints.

Exit codes (documented in the README, stable for shell scripts):

====  ==============================================================
0     every track finished
1     a track failed while generating or exporting (TrackError)
2     usage error: bad track name, prompt file, option value (UsageError)
3     environment problem: ffmpeg, model, device, output folder (EnvironmentProblem)
4     busy: another tydust-gen is writing the same track (TrackBusyError)
130   interrupted (Ctrl-C / SIGINT)
143   terminated (SIGTERM)
====  ==============================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_TRACK_FAILED = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
EXIT_BUSY = 4
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class TydustError(Exception):
    """Base class of every expected failure; ``str()`` is the user-facing line."""

    exit_code = EXIT_TRACK_FAILED


class UsageError(TydustError):
    """The user asked for something that cannot be done as asked."""

    exit_code = EXIT_USAGE


class PromptError(UsageError):
    """A track name or prompt file is missing, empty or malformed."""


class SettingsError(UsageError):
    """An option or prompt-file setting has a bad value (duration, seed, sampling...)."""


class MelodyError(UsageError):
    """The melody to follow cannot be used: missing, unreadable, silent, too long, or the model has no melody input."""


class EnvironmentProblem(TydustError):
    """Something the machine must provide is missing: ffmpeg, the model, a device, a writable folder."""

    exit_code = EXIT_ENVIRONMENT


class ModelError(EnvironmentProblem):
    """The model cannot be found or loaded."""


class DeviceError(EnvironmentProblem):
    """The requested device does not exist or cannot run the model."""


class FfmpegError(EnvironmentProblem):
    """ffmpeg is missing or lacks an encoder we need."""


class OutputDirError(EnvironmentProblem):
    """The output folder cannot be created or written."""


class TrackError(TydustError):
    """Generating or exporting one track failed after the checks passed."""

    exit_code = EXIT_TRACK_FAILED


class GenerationError(TrackError):
    """The model failed while generating (e.g. out of memory)."""


class ExportError(TrackError):
    """Encoding or writing an output file failed; ffmpeg's stderr travels in the message."""


class TrackBusyError(TydustError):
    """Another tydust-gen process holds the lock of a track we were asked to write."""

    exit_code = EXIT_BUSY
