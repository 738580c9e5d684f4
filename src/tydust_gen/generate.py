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

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from .engine import Conditioning, LoadedModel
from .errors import GenerationError, SettingsError
from .settings import GenerationSettings, SamplingSettings

#: progress(done_steps, total_steps) — decoding steps across all windows of a track.
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Window:
    """One generation pass.

    Attributes:
        context_frames: frames of earlier codes re-fed as prompt (0 for the first).
        new_frames: frames this pass adds.
    """

    context_frames: int
    new_frames: int


@dataclass(frozen=True)
class Waveform:
    """Audio samples with their rate.

    Attributes:
        samples: float32 tensor ``[C, N]`` (channels, samples), nominally in [-1, 1].
        sample_rate: Hz.
    """

    samples: Any
    sample_rate: int

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[-1])

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate


@dataclass(frozen=True)
class GeneratedTrack:
    """What the generation stage hands to audio processing.

    Attributes:
        codes: int64 ``[B, K, T]`` tokens (B takes, K codebooks, T frames).
        waveforms: one 32 kHz mono :class:`Waveform` per take, each ``[1, T × hop]``.
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


def window_steps(window: Window, num_codebooks: int) -> int:
    """Decoding steps for one window: one per frame plus the codebook delay."""
    return window.new_frames + num_codebooks - 1


def plan_windows(total_frames: int, window_frames: int, stride_frames: int) -> list[Window]:
    """Split ``total_frames`` into overlapping passes (audiocraft's extend_stride).

    >>> plan_windows(4500, 1500, 900)[:3]
    [Window(context_frames=0, new_frames=1500), Window(context_frames=600, new_frames=900), Window(context_frames=600, new_frames=900)]
    """
    if total_frames <= 0:
        raise SettingsError("the track must be at least one frame long")
    if not 0 < stride_frames < window_frames:
        raise SettingsError(
            f"stride must be shorter than the window and at least one frame "
            f"(got window {window_frames} frames, stride {stride_frames}); e.g. --window 30 --stride 18"
        )
    first = min(total_frames, window_frames)
    windows = [Window(0, first)]
    done = first
    context = window_frames - stride_frames
    while done < total_frames:
        new = min(stride_frames, total_frames - done)
        windows.append(Window(min(context, done), new))
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


class _StepHook:
    """A StoppingCriteria that never stops and reports each step (generate's streamer sees only one put)."""

    def __init__(self, on_step: Callable[[], None]):
        self.on_step = on_step

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.on_step()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def sampling_kwargs(loaded: LoadedModel, sampling: SamplingSettings) -> dict[str, Any]:
    """Translate our sampling settings into transformers ``generate`` keyword arguments.

    top_p > 0 takes precedence over top_k (audiocraft's rule); top_k is clamped to
    the codebook size; top_p = 0 turns nucleus sampling off.
    """
    kwargs: dict[str, Any] = {"do_sample": sampling.do_sample, "guidance_scale": sampling.guidance_scale}
    if sampling.do_sample:
        kwargs["temperature"] = sampling.temperature
        if sampling.top_p > 0:
            kwargs["top_p"] = sampling.top_p
            kwargs["top_k"] = 0
        else:
            kwargs["top_p"] = 1.0
            kwargs["top_k"] = min(sampling.top_k, loaded.codebook_size)
    return kwargs


def _prefill_context(model, cache, ids, cond: Conditioning, start: int, p: int) -> None:
    """Put the first ``p`` delay-masked positions of ``ids`` ([B·K, 1+P]) into ``cache``.

    MusicGen's ``prepare_inputs_for_generation`` (transformers 5) feeds only the
    last input column whenever a cache object exists, the prefill included, so a
    prefix handed to ``generate`` would be kept in the output but never attended
    to. With the first ``p`` positions already cached, that last column is
    exactly the one position still missing.
    """
    import torch

    masked, _ = model.decoder.build_delay_pattern_mask(ids, pad_token_id=start, max_length=ids.shape[-1] + 4096)
    context = masked[:, :p]
    copies = cond.hidden.shape[0] // (ids.shape[0] // model.decoder.num_codebooks)
    if copies > 1:
        context = context.repeat((copies, 1))
    with torch.inference_mode():
        model.decoder(
            input_ids=context,
            encoder_hidden_states=cond.hidden,
            encoder_attention_mask=cond.mask,
            cache=cache,
            use_cache=True,
        )


class StockBackend:
    """transformers' own decoder ``generate`` (eager, dynamic KV cache)."""

    name = "stock"

    def generate_window(self, loaded, cond, prefix, new_frames, sampling, on_step):
        import torch
        from transformers import DynamicCache, EncoderDecoderCache, StoppingCriteriaList

        model = loaded.model
        gen_cfg = model.generation_config
        start = gen_cfg.decoder_start_token_id
        k = loaded.num_codebooks
        b = cond.batch_size
        ids = torch.full((b * k, 1), start, dtype=torch.long, device=loaded.device)
        p = 0
        if prefix is not None:
            p = int(prefix.shape[-1])
            ids = torch.cat([ids, prefix.reshape(b * k, p).to(loaded.device)], dim=-1)
        # The decoder's self-attention mask is per take ([B, seq]), not per codebook row;
        # left to itself, generate() would infer one from ids (the start token equals
        # the pad token) with the wrong shape.
        self_mask = torch.ones((b, p + 1), dtype=torch.long, device=loaded.device)
        # Self- and cross-attention need separate caches; decoder.generate alone
        # would make one DynamicCache and mix the text keys into the audio keys.
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        if p:
            _prefill_context(model, cache, ids, cond, start, p)
        out = model.decoder.generate(
            input_ids=ids,
            cache=cache,
            attention_mask=self_mask,
            encoder_hidden_states=cond.hidden,
            encoder_attention_mask=cond.mask,
            max_new_tokens=new_frames + k - 1,
            pad_token_id=gen_cfg.pad_token_id,
            bos_token_id=gen_cfg.bos_token_id,
            decoder_start_token_id=start,
            num_return_sequences=1,
            use_cache=True,
            stopping_criteria=StoppingCriteriaList([_StepHook(on_step)]),
            **sampling_kwargs(loaded, sampling),
        )
        return out[:, :, p:]


def generate_codes(
    loaded: LoadedModel,
    cond: Conditioning,
    settings: GenerationSettings,
    *,
    backend: CodeBackend | None = None,
    progress: ProgressCallback | None = None,
    take_seeds: list[int] | None = None,
) -> tuple[Any, list[Window], int]:
    """Generate all codes of a track, window by window.

    With ``take_seeds`` (one per row of the batch; variations of one prompt)
    each take samples from its own stream seeded with its seed, kept across
    windows, so a take equals a single-row run with that seed. Without, all
    rows draw from torch's global RNG seeded with ``settings.seed``, exactly
    as transformers' ``generate`` does.

    Returns:
        ``(codes [B, K, T] int64, windows, steps)``.

    Raises:
        GenerationError: the model failed (out of memory, NaN...).
    """
    import torch

    if backend is None:
        from .backends import shared_backend

        backend = shared_backend(settings.backend)
    total, window_frames, stride_frames = frames_for(settings, loaded.frame_rate)
    check_window_fits(loaded, min(window_frames, total))
    windows = plan_windows(total, window_frames, stride_frames)
    total_steps = sum(window_steps(w, loaded.num_codebooks) for w in windows)
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
    codes = None
    try:
        with torch.inference_mode():
            for w in windows:
                prefix = None if w.context_frames == 0 else codes[:, :, -w.context_frames :]
                new = backend.generate_window(loaded, cond, prefix, w.new_frames, settings.sampling, on_step, **extra)
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
    return codes, windows, total_steps


def decode_codes(loaded: LoadedModel, codes) -> list[Waveform]:
    """EnCodec-decode ``[B, K, T]`` codes into B mono float32 waveforms at the model rate.

    Takes are decoded one at a time: a batched convolution may round differently
    from a single one, and a take of a batch must decode to exactly the samples
    it has when generated alone from its seed.
    """
    import torch

    expected = codes.shape[-1] * loaded.sample_rate // loaded.frame_rate
    waves = []
    with torch.inference_mode():
        for take in codes.split(1, dim=0):
            audio = loaded.model.audio_encoder.decode(take[None], audio_scales=[None]).audio_values
            waves.append(Waveform(samples=audio[0, :, :expected].float().cpu(), sample_rate=loaded.sample_rate))
    return waves


def generate_track(
    loaded: LoadedModel,
    prompts: list[str],
    settings: GenerationSettings,
    *,
    backend: CodeBackend | None = None,
    progress: ProgressCallback | None = None,
) -> GeneratedTrack:
    """Text in, 32 kHz waveforms out: encode once, generate all windows, decode once."""
    cond = encode_text(loaded, prompts, settings.sampling.guidance_scale)
    codes, windows, steps = generate_codes(loaded, cond, settings, backend=backend, progress=progress)
    waveforms = decode_codes(loaded, codes)
    return GeneratedTrack(codes=codes, waveforms=waveforms, windows=windows, steps=steps, seed=settings.seed)


from .engine import encode_text  # noqa: E402  (kept at the bottom to read top-down)
