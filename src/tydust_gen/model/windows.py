"""The window plan: how a track longer than the model's 30 s span is generated.

Like audiocraft's ``extend_stride``: the first window makes up to ``window``
seconds; every further window is prompted with the last ``window - stride``
seconds of codes and adds up to ``stride`` seconds of new codes. The prefix is
kept token for token, so a track has exactly ``ceil(duration × frame_rate)``
frames with nothing repeated or missing at a join.

A track in sections (``[[section]]`` in the prompt file) also needs a window
boundary at every section start, so that each window's new frames belong to
one section and can be conditioned on its text: a window that would cross a
start ends there, and the next begins there with the usual context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from tydust_gen.base.errors import SettingsError
from tydust_gen.base.settings import GenerationSettings
from tydust_gen.model.loading import LoadedModel


@dataclass(frozen=True)
class Window:
    """One generation pass.

    Attributes:
        context_frames: frames of earlier codes re-fed as prompt (0 for the first).
        new_frames: frames this pass adds.
        section: index of the section the new frames belong to (0 without sections).
    """

    context_frames: int
    new_frames: int
    section: int = 0


def window_steps(window: Window, delay_codebooks: int) -> int:
    """Decoding steps for one window: one per frame plus the codebook delay.

    ``delay_codebooks`` is the delay pattern's depth: the codebook count of a mono
    model, half of it for a stereo one (its left/right pairs share one delay).
    """
    return window.new_frames + delay_codebooks - 1


def plan_windows(
    total_frames: int, window_frames: int, stride_frames: int, section_starts: Sequence[int] = (), prompt_frames: int = 0
) -> list[Window]:
    """Split ``total_frames`` into overlapping passes (audiocraft's extend_stride).

    ``section_starts`` are the frames where sections 1, 2, ... begin (section 0
    begins at frame 0); a pass never crosses one. ``prompt_frames`` of given
    codes (a continued track's tail) come before the track: the first window
    holds them as its context and adds what is left of the window; later windows
    may reach back into them.

    >>> plan_windows(4500, 1500, 900)[:3]
    [Window(context_frames=0, new_frames=1500, section=0), Window(context_frames=600, new_frames=900, section=0), Window(context_frames=600, new_frames=900, section=0)]
    >>> plan_windows(2000, 1500, 900, section_starts=[500])
    [Window(context_frames=0, new_frames=500, section=0), Window(context_frames=500, new_frames=900, section=1), Window(context_frames=600, new_frames=600, section=1)]
    """
    if total_frames <= 0:
        raise SettingsError("the track must be at least one frame long")
    if not 0 < stride_frames < window_frames:
        raise SettingsError(
            f"stride must be shorter than the window and at least one frame "
            f"(got window {window_frames} frames, stride {stride_frames}); e.g. --window 30 --stride 18"
        )
    if prompt_frames >= window_frames:
        raise SettingsError(
            f"the continuation context ({prompt_frames} frames) must be shorter than the window "
            f"({window_frames} frames); use a shorter --context or a longer --window"
        )
    starts = list(section_starts)
    if any(b <= a for a, b in zip([0, *starts], starts)) or (starts and starts[-1] >= total_frames):
        raise SettingsError(f"section starts {starts} must increase and fall inside the track's {total_frames} frames")

    def section_at(frame: int) -> int:
        return sum(start <= frame for start in starts)

    def room(done: int) -> int:  # frames until the next section start (or the end)
        return min([s for s in starts if s > done] + [total_frames]) - done

    first = min(total_frames, window_frames - prompt_frames, room(0))
    windows = [Window(prompt_frames, first, 0)]
    done = first
    context = window_frames - stride_frames
    while done < total_frames:
        new = min(stride_frames, room(done))
        windows.append(Window(min(context, done + prompt_frames), new, section_at(done)))
        done += new
    return windows


def frames_for(settings: GenerationSettings, frame_rate: int) -> tuple[int, int, int]:
    """``(total, window, stride)`` in frames for these settings at ``frame_rate`` frames/s."""
    total = math.ceil(round(settings.duration_s * frame_rate, 6))
    window = max(1, round(settings.window_s * frame_rate))
    stride = max(1, round(settings.stride_s * frame_rate))
    return total, window, stride


def check_window_fits(loaded: LoadedModel, window_frames: int) -> None:
    """Refuse windows longer than the decoder's position table."""
    if window_frames > loaded.max_window_frames:
        longest = loaded.max_window_frames / loaded.frame_rate
        raise SettingsError(
            f"window of {window_frames / loaded.frame_rate:g} s is longer than this model allows "
            f"({longest:g} s); use a smaller --window"
        )
