"""Generation stage: text conditioning → audio codes → 32 kHz waveform.

Tracks longer than one window are generated like audiocraft's ``extend_stride``:
the first window makes up to ``window`` seconds; every further window is
prompted with the last ``window - stride`` seconds of codes and adds up to
``stride`` seconds of new codes. The prefix is kept token for token, so the
result has exactly ``ceil(duration × frame_rate)`` frames with nothing repeated
or missing at a join. The codes are decoded by EnCodec once, at the end.

How one window is decoded is a :class:`CodeBackend`; ``StockBackend`` runs
transformers' own ``generate``. The random number generator is seeded once per
track, so a seed reproduces a track on the same device and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from tydust_gen.base import signals
from tydust_gen.base.errors import GenerationError, SettingsError
from tydust_gen.base.settings import GenerationSettings, SamplingSettings
from tydust_gen.model.conditioning import Conditioning, SectionConditioning
from tydust_gen.model.loading import LoadedModel

#: progress(done_steps, total_steps) — decoding steps across all windows of a track.
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class GeneratedTrack:
    """What the generation stage hands to audio processing.

    Attributes:
        codes: int64 ``[B, K, T]`` tokens (B takes, K codebooks, T frames).
        waveforms: one 32 kHz :class:`Waveform` per take, each ``[C, T × hop]`` (C: the model's channels).
        windows: the passes that produced the codes.
        steps: decoding steps run in total.
        seed: the seed used (None if none was set).
    """

    codes: Any
    waveforms: list[Waveform]
    windows: list[Window]
    steps: int
    seed: int | None


class CodeBackend(Protocol):
    """Decodes new tokens for one window. Implementations must use torch's global RNG."""

    name: str

    def generate_window(
        self,
        loaded: LoadedModel,
        cond: Conditioning,
        prefix: Any | None,
        new_frames: int,
        sampling: SamplingSettings,
        on_step: Callable[[], None],
    ) -> Any:
        """Generate ``new_frames`` frames after ``prefix``.

        Args:
            loaded: the model.
            cond: text conditioning (computed once per track).
            prefix: int64 ``[B, K, P]`` earlier codes, or None.
            new_frames: frames to add.
            sampling: sampling parameters.
            on_step: call once after each decoding step.

        Returns:
            int64 ``[B, K, new_frames]`` new codes on ``loaded.device``.
        """
        ...


def generate_codes(
    loaded: LoadedModel,
    cond: Conditioning,
    settings: GenerationSettings,
    *,
    backend: CodeBackend,
    progress: ProgressCallback | None = None,
    take_seeds: list[int] | None = None,
    sections: Sequence[SectionConditioning] = (),
    prompt_codes: Any | None = None,
) -> tuple[Any, list[Window], int]:
    """Generate all codes of a track, window by window.

    With ``prompt_codes`` (int64 ``[1, K, P]``, e.g. :func:`~tydust_gen.model.continuation.encode_prompt`
    of another track's tail) the first window continues them: they are its
    prefix, kept token for token, and are not part of the returned codes.

    With ``take_seeds`` (one per row of the batch; variations of one prompt)
    each take samples from its own stream seeded with its seed, kept across
    windows, so a take equals a single-row run with that seed. Without, all
    rows draw from torch's global RNG seeded with ``settings.seed``, exactly
    as transformers' ``generate`` does.

    With ``sections`` (the first starting at 0 s) a window boundary falls on
    every section start and each window is conditioned on, and samples with the
    settings of, the section its new frames belong to; ``cond`` is then unused.
    The codes of earlier windows are the context as usual, so the music carries
    across a section start.

    Returns:
        ``(codes [B, K, T] int64, windows, steps)``.

    Raises:
        GenerationError: the model failed (out of memory, NaN...).
    """
    import torch

    total, window_frames, stride_frames = frames_for(settings, loaded.frame_rate)
    check_window_fits(loaded, min(window_frames, total))
    if sections and sections[0].start_s != 0:
        raise ValueError("the first section must start at 0 s")
    starts = [round(sc.start_s * loaded.frame_rate) for sc in sections[1:]]
    prompt_len = 0 if prompt_codes is None else int(prompt_codes.shape[-1])
    windows = plan_windows(total, window_frames, stride_frames, starts, prompt_len)
    total_steps = sum(window_steps(w, loaded.delay_codebooks) for w in windows)
    done = 0

    def on_step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(min(done, total_steps), total_steps)

    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    extra: dict[str, Any] = {}
    if take_seeds is not None:
        if len(take_seeds) != cond.batch_size:
            raise ValueError(f"{len(take_seeds)} take seeds for a batch of {cond.batch_size}")
        if not getattr(backend, "supports_take_generators", False):
            raise SettingsError(f"the {backend.name} backend cannot give each take its own seed; use --backend fast")
        extra["generators"] = [torch.Generator(device=loaded.device).manual_seed(s) for s in take_seeds]
    if sections and any(sc.cond.batch_size != sections[0].cond.batch_size for sc in sections):
        raise ValueError("every section's conditioning must have the same batch size")
    codes = None
    if prompt_codes is not None:
        if prompt_codes.shape[:2] != (1, loaded.num_codebooks):
            raise ValueError(f"prompt codes of shape {tuple(prompt_codes.shape)} for a {loaded.num_codebooks}-codebook model")
        codes = prompt_codes.to(loaded.device).expand(cond.batch_size, -1, -1).contiguous()
    try:
        with torch.inference_mode():
            for w in windows:
                prefix = None if w.context_frames == 0 else codes[:, :, -w.context_frames :]
                window_cond, sampling = (sections[w.section].cond, sections[w.section].sampling) if sections else (cond, settings.sampling)
                new = backend.generate_window(loaded, window_cond, prefix, w.new_frames, sampling, on_step, **extra)
                if new.shape[-1] != w.new_frames:
                    raise GenerationError(
                        f"the {backend.name} backend returned {new.shape[-1]} frames instead of {w.new_frames}"
                    )
                codes = new if codes is None else torch.cat([codes, new], dim=-1)
    except torch.cuda.OutOfMemoryError as exc:
        raise GenerationError(
            "the GPU ran out of memory while generating; use a shorter --window or --device cpu"
        ) from exc
    if progress is not None:
        progress(total_steps, total_steps)
    return codes[:, :, prompt_len:], windows, total_steps


def decode_codes(loaded: LoadedModel, codes, lead_in=None) -> list[Waveform]:
    """EnCodec-decode ``[B, K, T]`` codes into B float32 ``[C, N]`` waveforms at the model rate.

    Takes are decoded one at a time: a batched convolution may round differently
    from a single one, and a take of a batch must decode to exactly the samples
    it has when generated alone from its seed. EnCodec's LSTM and convolutions
    each run over the whole track in one torch call (seconds for a long track),
    so the decode runs where Ctrl-C does not wait for it (:func:`signals.interruptible`).

    ``lead_in`` (int64 ``[1, K, P]``,
    a continuation's prompt codes) is decoded ahead of each take and cut off
    again, so EnCodec's convolutions and LSTM start the new music from the old
    one's state instead of from silence. A stereo model's codebooks
    alternate left, right, left, ... (transformers' layout); each channel's
    codebooks go through the mono EnCodec on their own, left then right.
    """
    return signals.interruptible(_decode_takes, loaded, codes, lead_in)


def _decode_takes(loaded: LoadedModel, codes, lead_in=None) -> list[Waveform]:
    import torch

    hop = loaded.sample_rate // loaded.frame_rate
    expected = codes.shape[-1] * hop
    skip = 0 if lead_in is None else int(lead_in.shape[-1]) * hop
    channels = loaded.audio_channels
    waves = []
    with torch.inference_mode():
        for take in codes.split(1, dim=0):
            if lead_in is not None:
                take = torch.cat([lead_in.to(take.device), take], dim=-1)
            sides = [
                loaded.model.audio_encoder.decode(take[None, :, c::channels], audio_scales=[None]).audio_values
                for c in range(channels)
            ]
            audio = torch.cat(sides, dim=1)
            waves.append(Waveform(samples=audio[0, :, skip : skip + expected].float().cpu(), sample_rate=loaded.sample_rate))
    return waves


def generate_track(
    loaded: LoadedModel,
    prompts: list[str],
    settings: GenerationSettings,
    *,
    backend: CodeBackend,
    progress: ProgressCallback | None = None,
) -> GeneratedTrack:
    """Text in, 32 kHz waveforms out: encode once, generate all windows, decode once."""
    cond = encode_text(loaded, prompts, settings.sampling.guidance_scale)
    codes, windows, steps = generate_codes(loaded, cond, settings, backend=backend, progress=progress)
    waveforms = decode_codes(loaded, codes)
    return GeneratedTrack(codes=codes, waveforms=waveforms, windows=windows, steps=steps, seed=settings.seed)


from tydust_gen.model.conditioning import encode_text  # noqa: E402  (kept at the bottom to read top-down)
from tydust_gen.base.waveform import Waveform
from tydust_gen.model.windows import Window, check_window_fits, frames_for, plan_windows, window_steps
