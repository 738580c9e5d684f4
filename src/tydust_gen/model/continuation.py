"""Continuation: earlier audio → EnCodec codes that prompt a track's first window.

The codes of the last seconds of another track (``--continue-from``) are fed to
the decoder as the first window's prefix, so the new music picks up the old
one's key, tempo and sound; the prefix itself is not part of the output. A
stereo model's prefix is interleaved as its own codes are (left, right, left,
...), each channel encoded by the mono EnCodec on its own, as transformers does
for an audio prompt.
"""

from __future__ import annotations

from typing import Any

from tydust_gen.base.errors import SettingsError
from tydust_gen.model.loading import LoadedModel


def prompt_frames(loaded: LoadedModel, context_s: float, available_samples: int) -> int:
    """Frames of context: ``context_s`` seconds, or what the audio holds when it is shorter.

    Raises:
        SettingsError: the audio is shorter than one codec frame.
    """
    hop = loaded.sample_rate // loaded.frame_rate
    frames = min(round(context_s * loaded.frame_rate), available_samples // hop)
    if frames < 1:
        raise SettingsError(f"the audio to continue is shorter than one codec frame ({hop} samples); pass a longer file")
    return frames


def encode_prompt(loaded: LoadedModel, samples) -> Any:
    """EnCodec codes of ``samples`` (float ``[C, N]`` at the model rate, C = the model's channels).

    N should be a whole number of frames (``frames × hop``): EnCodec pads a partial one.

    Returns:
        int64 ``[1, K, N / hop]`` on ``loaded.device``, K = the decoder's codebooks.
    """
    import torch

    channels = loaded.audio_channels
    if samples.shape[0] != channels:
        raise ValueError(f"{samples.shape[0]} channels of audio for a {channels}-channel model")
    encoder = loaded.model.audio_encoder
    dtype = next(encoder.parameters()).dtype
    with torch.inference_mode():
        sides = [
            encoder.encode(samples[None, c : c + 1].to(device=loaded.device, dtype=dtype)).audio_codes[0]
            for c in range(channels)
        ]  # each [1, K / C, frames]
    per_channel = loaded.num_codebooks // channels
    if sides[0].shape[1] < per_channel:
        raise ValueError(f"EnCodec gave {sides[0].shape[1]} codebooks, the decoder reads {per_channel} per channel")
    # residual quantisation: the first n codebooks are exactly an n-codebook encoding
    sides = [side[:, :per_channel] for side in sides]
    if channels == 1:
        return sides[0].long()
    codes = torch.empty((1, loaded.num_codebooks, sides[0].shape[-1]), dtype=torch.long, device=loaded.device)
    for c, side in enumerate(sides):
        codes[:, c::channels] = side
    return codes
