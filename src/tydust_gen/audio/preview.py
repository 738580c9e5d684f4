"""Preview picture: a PNG with the waveform and a spectrogram of a finished track.

The picture lets someone check a batch of tracks at a glance (silence, clipping,
a lopsided channel, a harsh top end, where a loop wraps) without listening to
each. matplotlib is an optional extra (``pip install tydust-gen[preview]``) and
is imported only when a picture is asked for, with the non-interactive Agg
backend so no display is needed.

The PNG appears whole or not at all: it is rendered to a temporary name in the
destination folder and moved into place with ``os.replace``. It gets the mode
any new file gets under the user's umask, like the MP3 and OGG beside it.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tydust_gen.audio.master import as_audio
from tydust_gen.base.errors import EnvironmentProblem, OutputDirError

PREVIEW_SIZE_IN = (12.0, 6.0)  # inches; with PREVIEW_DPI a 1200 x 600 px picture
PREVIEW_DPI = 100  # dots per inch
WAVEFORM_COLUMNS = 2000  # min/max pairs drawn; enough for the width, far fewer than the samples
SPECTROGRAM_NFFT = 2048  # samples; ~46 ms at 44.1 kHz, resolves notes down to ~40 Hz apart
SPECTROGRAM_RANGE_DB = 90.0  # dB shown below the loudest bin
SEAM_COLOR = "#d62728"
SECTION_COLOR = "#2ca02c"  # section starts (green, dotted)
TEMP_NAME_TRIES = 100  # random temporary names tried before giving up (as tempfile does)


def _load_pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise EnvironmentProblem(
            "the preview picture needs matplotlib; install tydust-gen[preview] (pip install 'tydust-gen[preview]')"
        ) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _create_temporary(dest: Path) -> tuple[int, str]:
    """Open a new temporary file beside ``dest``; returns ``(fd, name)``.

    Not ``tempfile.mkstemp``: it creates files mode 0600, and the PNG is
    published beside MP3/OGG files that get the mode a normal file gets under
    the user's umask. ``os.open`` with 0o666 lets the umask decide, as for them.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)  # O_BINARY: Windows
    for _ in range(TEMP_NAME_TRIES):
        name = str(dest.parent / f".{dest.stem}.{secrets.token_hex(8)}.png.tmp")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(dest.parent))


def _min_max_columns(channel: np.ndarray, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-column minimum and maximum, so every peak stays visible after downsampling."""
    n = channel.size
    columns = max(1, min(columns, n))
    edges = np.linspace(0, n, columns + 1).astype(np.int64)
    starts = edges[:-1]
    lows = np.minimum.reduceat(channel, starts)
    highs = np.maximum.reduceat(channel, starts)
    return lows, highs


def render_preview(
    samples: Any,
    sample_rate: int,
    path: str | os.PathLike[str],
    title: str = "",
    loop_seam: int | None = None,
    sections: Sequence[tuple[float, str]] = (),
) -> Path:
    """Write a PNG with the waveform of each channel and a spectrogram of the mix.

    Args:
        samples: ``[C, N]`` audio, full scale 1.0 (numpy array or torch tensor).
        sample_rate: Hz.
        path: destination ``.png``; its folder must exist.
        title: drawn above the picture (e.g. the track name and loudness).
        loop_seam: sample index where the loop wraps (usually ``LOOPSTART +
            LOOPLENGTH``, i.e. N for a whole-file loop), marked by a vertical
            line on both plots; None for no mark.
        sections: ``(start in seconds, label)`` of each section after the first,
            marked by a dotted line and its label; starts past the end are not drawn.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        EnvironmentProblem: matplotlib is not installed.
        OutputDirError: the PNG cannot be written.
    """
    plt = _load_pyplot()
    audio = as_audio(samples)
    channels, n = audio.shape
    if n == 0:
        raise ValueError("cannot draw a preview of empty audio")
    if loop_seam is not None and not 0 <= loop_seam <= n:
        raise ValueError(f"loop seam {loop_seam} is outside the track (0..{n} samples)")
    dest = Path(path)
    duration = n / sample_rate

    fig, axes = plt.subplots(
        channels + 1, 1, figsize=PREVIEW_SIZE_IN, sharex=True,
        gridspec_kw={"height_ratios": [1] * channels + [2]},
    )  # fmt: skip
    try:
        labels = ["L", "R"] if channels == 2 else [f"ch{i + 1}" for i in range(channels)]
        for ax, channel, label in zip(axes[:-1], audio, labels):
            lows, highs = _min_max_columns(channel, WAVEFORM_COLUMNS)
            times = np.linspace(0.0, duration, lows.size)
            ax.fill_between(times, lows, highs, color="#1f77b4", linewidth=0.5)
            ax.set_ylim(-1.05, 1.05)
            ax.axhline(0.0, color="0.6", linewidth=0.5)
            ax.set_ylabel(label)

        spec_ax = axes[-1]
        mono = audio.mean(axis=0)
        nfft = min(SPECTROGRAM_NFFT, 1 << max(3, int(np.log2(n)) - 1))
        spectrum, freqs, times, image = spec_ax.specgram(
            mono, NFFT=nfft, Fs=sample_rate, noverlap=nfft // 2, cmap="magma", scale="dB", mode="magnitude"
        )
        top_db = 20.0 * np.log10(max(float(spectrum.max()), 1e-12))
        image.set_clim(top_db - SPECTROGRAM_RANGE_DB, top_db)
        spec_ax.set_ylabel("Hz")
        spec_ax.set_xlabel("time (s)")
        spec_ax.set_xlim(0.0, duration)

        if loop_seam is not None:
            seam_t = loop_seam / sample_rate
            for ax in axes:
                ax.axvline(seam_t, color=SEAM_COLOR, linewidth=1.2, linestyle="--")
            axes[0].annotate(
                "loop", (seam_t, 1.0), color=SEAM_COLOR, xytext=(-4, -2), textcoords="offset points",
                ha="right", va="top", fontsize=8,
            )  # fmt: skip
        for start, label in sections:
            if 0 < start < duration:
                for ax in axes:
                    ax.axvline(start, color=SECTION_COLOR, linewidth=1.0, linestyle=":")
                axes[0].annotate(
                    label, (start, 1.0), color=SECTION_COLOR, xytext=(3, -2), textcoords="offset points",
                    ha="left", va="top", fontsize=8,
                )  # fmt: skip
        if title:
            fig.suptitle(title)
        fig.tight_layout()

        try:
            fd, tmp_name = _create_temporary(dest)
        except OSError as exc:
            raise OutputDirError(f"cannot write the preview picture in {dest.parent}: {exc}") from exc
        try:
            with os.fdopen(fd, "wb") as handle:
                fig.savefig(handle, format="png", dpi=PREVIEW_DPI)
            os.replace(tmp_name, dest)
        except BaseException as exc:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise OutputDirError(f"cannot write the preview picture {dest}: {exc}") from exc
            raise
    finally:
        plt.close(fig)
    return dest


__all__ = ["render_preview"]
