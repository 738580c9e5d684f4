"""Melody conditioning: a tune's chroma steers a melody model (``facebook/musicgen-melody``, ``-melody-large``).

transformers' ``MusicgenMelodyForConditionalGeneration`` has no cross-attention: the
chroma of the melody (12 pitch classes, one-hot per frame of 4096 samples at 32 kHz,
computed by ``MusicgenMelodyFeatureExtractor``), projected to the decoder width and
tiled or cut to ``chroma_length`` frames (235 = 30 s), is prepended to the text's hidden
states, and both are prepended to the decoder's audio tokens. Classifier-free guidance
pairs each take with an unconditional row whose text is all zeros and whose chroma is
the one-hot "null" melody (bin 0), as transformers' ``generate`` builds it.

A track longer than one window follows audiocraft's ``MusicGen._generate_tokens``: each
window is conditioned on the ``MELODY_SPAN_S`` seconds of melody that start where the
window starts in the track, the melody repeating end to start when it is shorter
(sample ``i`` of the span is melody sample ``(start + i) mod length``). A track of one
window is conditioned on the whole melody, which the feature extractor cuts to 30 s and
the model tiles when it is shorter.

Decoding the file (ffmpeg) happens above this layer (:mod:`tydust_gen.runs.pipeline`);
this module takes mono samples at the feature extractor's rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from tydust_gen.base.errors import MelodyError
from tydust_gen.model.conditioning import Conditioning
from tydust_gen.model.loading import LoadedModel
from tydust_gen.model.windows import Window

#: Seconds of melody each window of a multi-window track is conditioned on: audiocraft's
#: ``max_duration`` for the melody models, 235 chroma frames at 32 kHz / 4096 (the model's chroma_length).
MELODY_SPAN_S = 30.0  # s
#: The backend melody models run on (their conditioning precedes the audio tokens; fast.py has no such path).
MELODY_BACKEND = "stock"
#: Longest melody file accepted; longer ones are refused (decoding stops just past it).
MAX_MELODY_S = 600.0  # s, 10 minutes
#: A melody whose peak stays below this has no pitch to follow: its chroma would be the argmax of noise.
SILENT_PEAK_DBFS = -60.0  # dBFS
#: Chroma bin set in the "null" melody of the unconditional rows (transformers and audiocraft: bin 0 one-hot).
NULL_CHROMA_BIN = 0


@dataclass(frozen=True)
class MelodySlice:
    """The stretch of melody one window is conditioned on, in samples at the chroma rate.

    Attributes:
        start: first sample, counted on the melody repeated forever (taken modulo its length;
            negative before the track starts, e.g. under a continuation's context).
        length: samples in the span, or None for the whole melody (a track of one window).
    """

    start: int
    length: int | None

    def samples(self, melody: np.ndarray) -> np.ndarray:
        """This stretch of ``melody`` (float32 ``[N]``), repeated end to start where it runs past the end."""
        if self.length is None:
            return melody
        positions = np.arange(self.start, self.start + self.length) % melody.shape[-1]
        return melody[positions]

    def facts(self, sample_rate: int, melody_samples: int) -> dict[str, Any]:
        """What the provenance record says about it: where it starts and how long, in seconds."""
        if self.length is None:
            return {"start_s": 0.0, "length_s": round(melody_samples / sample_rate, 4), "whole": True}
        looped = self.start < 0 or self.start + self.length > melody_samples
        return {
            "start_s": round(self.start / sample_rate, 4),
            "length_s": round(self.length / sample_rate, 4),
            "whole": False,
            "looped": looped,
        }


def check_melody(samples: np.ndarray, sample_rate: int, name: str) -> None:
    """Refuse a melody that cannot steer anything: empty, longer than :data:`MAX_MELODY_S`, or silent.

    Raises:
        MelodyError: one line naming ``name``, the problem and the fix.
    """
    count = int(samples.shape[-1])
    if count == 0:
        raise MelodyError(f"melody {name} holds no audio; pass a file with the tune to follow")
    seconds = count / sample_rate
    if seconds > MAX_MELODY_S:
        raise MelodyError(
            f"melody {name} is longer than {MAX_MELODY_S / 60:g} minutes; cut it to the part the track should follow"
        )
    peak = float(np.max(np.abs(samples))) if count else 0.0
    if not np.isfinite(peak) or peak <= 10 ** (SILENT_PEAK_DBFS / 20):
        raise MelodyError(
            f"melody {name} is silent (peak below {SILENT_PEAK_DBFS:g} dBFS); pass a file where the tune can be heard"
        )


def window_slices(windows: Sequence[Window], frame_rate: int, sample_rate: int) -> list[MelodySlice]:
    """The melody stretch of each window (audiocraft's rule, see the module docstring).

    A window starts in the track where its context starts: the frames generated before
    it minus its context frames, which is before the track (negative) when a
    continuation's prompt is the first window's context. Its stretch starts at the same
    time in the melody and lasts :data:`MELODY_SPAN_S`.

    >>> [s.start for s in window_slices([Window(0, 1500), Window(600, 900), Window(600, 900)], 50, 32_000)]
    [0, 576000, 1152000]
    """
    if len(windows) == 1:
        return [MelodySlice(0, None)]
    span = int(MELODY_SPAN_S * sample_rate)
    out = []
    done = 0  # track frames generated before the window
    for w in windows:
        # frames → samples exactly when the hop is whole (640 at 32 kHz / 50 Hz); floor keeps negatives consistent
        out.append(MelodySlice(math.floor((done - w.context_frames) * sample_rate / frame_rate), span))
        done += w.new_frames
    return out


def chroma(loaded: LoadedModel, samples: np.ndarray | None):
    """The chroma of mono ``samples`` at the feature extractor's rate: float32 ``[1, T, 12]``, or None for None.

    Computed by the checkpoint's own ``MusicgenMelodyFeatureExtractor`` (torchaudio STFT,
    librosa chroma filters, one-hot argmax), exactly as transformers' processor does.
    """
    if samples is None:
        return None
    extractor = loaded.processor.feature_extractor
    features = extractor(
        np.ascontiguousarray(samples, dtype=np.float32), sampling_rate=extractor.sampling_rate, return_tensors="pt"
    )
    return features["input_features"]


def melody_conditioning(loaded: LoadedModel, text: Conditioning, melody_chroma=None) -> Conditioning:
    """The states a melody model's decoder reads before its audio tokens: chroma, then text.

    Equal to what transformers' ``MusicgenMelodyForConditionalGeneration.generate`` builds
    (``_prepare_encoder_hidden_states_kwargs_for_generation``) from the same text and
    ``input_features``: each take's chroma (``melody_chroma`` ``[1, T, 12]``, shared by
    the takes; None: the null melody, as transformers uses without audio) projected to the
    decoder width and tiled/cut to ``chroma_length`` frames, ahead of the text states of
    ``text`` (already masked, with guidance the all-zero unconditional half); with guidance
    the unconditional rows get the null melody.

    Returns:
        :class:`Conditioning` whose ``hidden`` is ``[B', chroma_length + L, D]`` and whose mask is
        all ones (the decoder attends to every prepended position, as in transformers).
    """
    import torch

    model = loaded.model
    proj_dtype = next(model.audio_enc_to_dec_proj.parameters()).dtype if hasattr(model, "audio_enc_to_dec_proj") else text.hidden.dtype
    device = text.hidden.device
    b = text.batch_size
    num_chroma = int(model.config.num_chroma)
    null = torch.zeros((b, 1 if melody_chroma is None else melody_chroma.shape[1], num_chroma), dtype=proj_dtype, device=device)
    null[:, :, NULL_CHROMA_BIN] = 1
    rows = null if melody_chroma is None else melody_chroma.to(device=device, dtype=proj_dtype).expand(b, -1, -1)
    with torch.inference_mode():
        if text.guided:
            rows = torch.cat([rows, null], dim=0)
        if num_chroma != model.decoder.config.hidden_size:
            rows = model.audio_enc_to_dec_proj(rows)
        length = int(model.config.chroma_length)
        if rows.shape[1] < length:
            rows = rows.repeat(1, math.ceil(length / rows.shape[1]), 1)
        rows = rows[:, :length]
        hidden = torch.cat([rows.to(text.hidden.dtype), text.hidden], dim=1)
    mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=device)
    return Conditioning(hidden=hidden, mask=mask, batch_size=b, guidance_scale=text.guidance_scale, texts=text.texts)


def check_melody_model(loaded: LoadedModel, has_melody: bool) -> None:
    """Refuse a melody for a model without melody input.

    Raises:
        MelodyError: ``has_melody`` and the model is not of the melody family.
    """
    if has_melody and loaded.family != "melody":
        raise MelodyError(melody_unsupported_message(loaded.source.ref))


def melody_unsupported_message(model_ref: str) -> str:
    """The one line for a melody given to a model without melody support."""
    return (
        f"model {model_ref} has no melody input; use --model facebook/musicgen-melody (or -melody-large) "
        "with --melody, or leave the melody out"
    )
