"""Generation stage: text conditioning → audio codes → 32 kHz waveform.

Tracks longer than one window are generated like audiocraft's ``extend_stride``:
the first window makes up to ``window`` seconds; every further window is
prompted with the last ``window - stride`` seconds of codes and adds up to
``stride`` seconds of new codes. The prefix is kept token for token, so the
result has exactly ``ceil(duration × frame_rate)`` frames with nothing repeated
or missing at a join. The codes are decoded by EnCodec once, at the end, in
windows that keep memory bounded and give the samples a single call would
(:func:`decode_take`).

How one window is decoded is a :class:`CodeBackend`; ``StockBackend`` runs
transformers' own ``generate``. The random number generator is seeded once per
track, so a seed reproduces a track on the same device and dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from tydust_gen.base import memory, processes, signals
from tydust_gen.base.errors import GenerationError, SettingsError
from tydust_gen.base.settings import GenerationSettings, SamplingSettings
from tydust_gen.model.conditioning import Conditioning, SectionConditioning
from tydust_gen.model.loading import LoadedModel

#: progress(done_steps, total_steps) — decoding steps across all windows of a track.
ProgressCallback = Callable[[int, int], None]

# EnCodec decoding in windows (decode_take). 500 frames are 10 s at 50 Hz: the upsampling layers then hold
# about 0.3 GB of activations at a time on the full-size model, against ~2 GB per minute of audio in one call.
DECODE_CHUNK_FRAMES = 500  # frames per window of the upsampling layers (and per LSTM slice)
# The layers after the LSTM reach about one frame past a window's span, and a window's edge padding as far:
# without context every join is wrong (errors ~0.1); 2 frames already gave one call's samples in every test, on
# the tiny and the full-size layout (tests/test_decode.py). 10 frames (0.2 s) each side leave a wide margin for
# 4 % more work.
DECODE_CONTEXT_FRAMES = 10  # frames

# What to change when generation runs out of memory with one take a batch (more takes are split first).
GENERATE_GPU_ADVICE = "use a shorter --window or --device cpu"
GENERATE_CPU_ADVICE = "close other programs or use a shorter --window"

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
    melody: Any | None = None,
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
    settings of, the section its new frames belong to; ``cond`` is then unused
    except for its batch size. The codes of earlier windows are the context as
    usual, so the music carries across a section start.

    With ``melody`` (mono float32 samples at the feature extractor's rate, for a model of
    the melody family) each window is conditioned on the chroma of its stretch of the
    melody (:func:`~tydust_gen.model.melody.window_slices`) ahead of its text. A melody
    model always gets that prepended conditioning, with the null melody when there is none.

    A batch of takes that runs out of memory is split in halves, and those
    again, down to one take a batch (:func:`_generate_in_batches`); because each
    take has its own seed, the takes are the ones the whole batch would give.

    Returns:
        ``(codes [B, K, T] int64, windows, steps)``; ``steps`` counts one batch's
        decoding steps (a split run repeats them for each smaller batch).

    Raises:
        GenerationError: the model failed (out of memory even one take at a time, NaN...).
        MelodyError: a melody for a model without melody input.
    """
    from tydust_gen.model import melody as melody_stage

    melody_stage.check_melody_model(loaded, melody is not None)
    total, window_frames, stride_frames = frames_for(settings, loaded.frame_rate)
    check_window_fits(loaded, min(window_frames, total))
    if sections and sections[0].start_s != 0:
        raise ValueError("the first section must start at 0 s")
    if sections and any(sc.cond.batch_size != cond.batch_size for sc in sections):
        raise ValueError("every section's conditioning must have the track's batch size")
    starts = [round(sc.start_s * loaded.frame_rate) for sc in sections[1:]]
    prompt_len = 0 if prompt_codes is None else int(prompt_codes.shape[-1])
    if prompt_codes is not None and prompt_codes.shape[:2] != (1, loaded.num_codebooks):
        raise ValueError(f"prompt codes of shape {tuple(prompt_codes.shape)} for a {loaded.num_codebooks}-codebook model")
    windows = plan_windows(total, window_frames, stride_frames, starts, prompt_len)
    total_steps = sum(window_steps(w, loaded.delay_codebooks) for w in windows)
    if take_seeds is not None:
        if len(take_seeds) != cond.batch_size:
            raise ValueError(f"{len(take_seeds)} take seeds for a batch of {cond.batch_size}")
        if not getattr(backend, "supports_take_generators", False):
            raise SettingsError(f"the {backend.name} backend cannot give each take its own seed; use --backend fast")
    chromas: tuple[Any, ...] | None = None
    if loaded.family == "melody":
        rate = loaded.processor.feature_extractor.sampling_rate
        slices = melody_stage.window_slices(windows, loaded.frame_rate, rate)
        chromas = tuple(melody_stage.chroma(loaded, None if melody is None else s.samples(melody)) for s in slices)
    track = _TrackInputs(cond, tuple(sections), prompt_codes, chromas)
    with memory.translated("generating", gpu_advice=GENERATE_GPU_ADVICE, cpu_advice=GENERATE_CPU_ADVICE):
        if take_seeds is None or len(take_seeds) == 1:
            codes = _generate_batch(loaded, track, settings, windows, backend, take_seeds, _counter(progress, total_steps))
        else:
            codes = _generate_in_batches(loaded, track, settings, windows, backend, take_seeds, progress, total_steps)
    if progress is not None:
        progress(total_steps, total_steps)
    return codes[:, :, prompt_len:], windows, total_steps


@dataclass(frozen=True)
class _TrackInputs:
    """What conditions every window of a batch: the text (one per section, or one), a continuation's codes,
    and for a melody model each window's chroma (``[1, T, 12]``, or None for the null melody)."""

    cond: Conditioning
    sections: tuple[SectionConditioning, ...]
    prompt_codes: Any | None
    chromas: tuple[Any, ...] | None = None

    def takes(self, start: int, stop: int) -> "_TrackInputs":
        """The same inputs for takes ``start`` to ``stop`` of the batch."""
        sections = tuple(SectionConditioning(sc.start_s, sc.cond.takes(start, stop), sc.sampling) for sc in self.sections)
        return _TrackInputs(self.cond.takes(start, stop), sections, self.prompt_codes, self.chromas)

    def for_window(
        self, loaded: LoadedModel, index: int, w: Window, settings: GenerationSettings
    ) -> tuple[Conditioning, SamplingSettings]:
        if self.sections:
            section = self.sections[w.section]
            cond, sampling = section.cond, section.sampling
        else:
            cond, sampling = self.cond, settings.sampling
        if self.chromas is not None:
            from tydust_gen.model.melody import melody_conditioning

            cond = melody_conditioning(loaded, cond, self.chromas[index])
        return cond, sampling


def _counter(progress: ProgressCallback | None, total_steps: int) -> Callable[[], None]:
    """An ``on_step`` that reports ``(steps done, total_steps)`` to ``progress``."""
    done = 0

    def on_step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(min(done, total_steps), total_steps)

    return on_step


def _generate_in_batches(
    loaded: LoadedModel,
    track: _TrackInputs,
    settings: GenerationSettings,
    windows: list[Window],
    backend: CodeBackend,
    take_seeds: list[int],
    progress: ProgressCallback | None,
    total_steps: int,
):
    """All takes at once if they fit; else batches of half as many (rounded up), and so on down to one take.

    Takes already generated are kept when a later batch has to be split. Progress
    is reported as the share of all takes' steps done, never going back (a batch
    that fails partway is redone without the bar moving).
    """
    import torch

    count = len(take_seeds)
    size, start, shown = count, 0, 0
    parts = []

    def batch_progress(first: int, stop: int) -> ProgressCallback:
        def report(done: int, total: int) -> None:
            nonlocal shown
            value = (first * total + done * (stop - first)) // count
            if progress is not None and value > shown:
                shown = value
                progress(value, total)

        return report

    while start < count:
        stop = min(count, start + size)
        part = track if (start, stop) == (0, count) else track.takes(start, stop)
        on_step = _counter(batch_progress(start, stop), total_steps)
        try:
            parts.append(_generate_batch(loaded, part, settings, windows, backend, take_seeds[start:stop], on_step))
        except (RuntimeError, MemoryError) as exc:
            if stop - start == 1 or not memory.is_out_of_memory(exc):
                raise
            memory.release_cached_memory()
            size = (stop - start + 1) // 2
            continue
        start = stop
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _generate_batch(
    loaded: LoadedModel,
    track: _TrackInputs,
    settings: GenerationSettings,
    windows: list[Window],
    backend: CodeBackend,
    take_seeds: list[int] | None,
    on_step: Callable[[], None],
):
    """One batch through every window: ``[B, K, P + T]`` codes (a continuation's P prompt frames first)."""
    import torch

    if settings.seed is not None:
        torch.manual_seed(settings.seed)
    extra: dict[str, Any] = {}
    if take_seeds is not None:
        extra["generators"] = [torch.Generator(device=loaded.device).manual_seed(s) for s in take_seeds]
    codes = None
    if track.prompt_codes is not None:
        codes = track.prompt_codes.to(loaded.device).expand(track.cond.batch_size, -1, -1).contiguous()
    with torch.inference_mode():
        for index, w in enumerate(windows):
            prefix = None if w.context_frames == 0 else codes[:, :, -w.context_frames :]
            window_cond, sampling = track.for_window(loaded, index, w, settings)
            new = backend.generate_window(loaded, window_cond, prefix, w.new_frames, sampling, on_step, **extra)
            if new.shape[-1] != w.new_frames:
                raise GenerationError(
                    f"the {backend.name} backend returned {new.shape[-1]} frames instead of {w.new_frames}"
                )
            codes = new if codes is None else torch.cat([codes, new], dim=-1)
            # the window's cache and working arrays are freed: give them back before the next window (or,
            # after the last, before EnCodec decoding starts from the loaded model's footprint)
            processes.release_free_memory()
    return codes


def decode_codes(
    loaded: LoadedModel,
    codes,
    lead_in=None,
    *,
    chunk_frames: int = DECODE_CHUNK_FRAMES,
    context_frames: int = DECODE_CONTEXT_FRAMES,
) -> list[Waveform]:
    """EnCodec-decode ``[B, K, T]`` codes into B float32 ``[C, N]`` waveforms at the model rate.

    Takes are decoded one at a time (:func:`decode_takes`). Memory stays bounded
    whatever the length (see :func:`decode_take`): only the frame-rate part of the
    decoder sees the whole track; the upsampling layers, whose activations are what
    grows (64 channels at 32 kHz, several GB for a long track in one call), run on
    windows of ``chunk_frames`` frames with ``context_frames`` of context on each
    side that is computed and discarded. EnCodec's LSTM still runs over the
    whole track in torch calls of seconds, so the decode runs where Ctrl-C does
    not wait for it (:func:`signals.interruptible`).

    ``lead_in`` (int64 ``[1, K, P]``, a continuation's prompt codes) is decoded
    ahead of each take and cut off again, so EnCodec's convolutions and LSTM
    start the new music from the old one's state instead of from silence. A
    stereo model's codebooks alternate left, right, left, ... (transformers'
    layout); each channel's codebooks go through the mono EnCodec on their own.

    Raises:
        GenerationError: memory ran out (GPU or CPU), with what to do about it.
    """
    with memory.translated("decoding the audio"):
        return signals.interruptible(
            decode_takes, loaded, codes, lead_in, chunk_frames=chunk_frames, context_frames=context_frames
        )


def decode_takes(loaded: LoadedModel, codes, lead_in=None, *, chunk_frames: int, context_frames: int) -> list[Waveform]:
    """The per-take loop of :func:`decode_codes`.

    One take at a time: a batched convolution may round differently from a
    single one, and a take of a batch must decode to exactly the samples it has
    when generated alone from its seed.
    """
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
                decode_take(loaded.model.audio_encoder, take[:, c::channels], chunk_frames=chunk_frames, context_frames=context_frames)
                for c in range(channels)
            ]
            audio = torch.cat(sides, dim=1)
            waves.append(Waveform(samples=audio[0, :, skip : skip + expected].float().cpu(), sample_rate=loaded.sample_rate))
    return waves


@dataclass(frozen=True)
class _StagedDecoder:
    """EnCodec's decoder cut where chunking is exact: frame-rate head, LSTM, time-local upsampling tail."""

    head: Any  # the first convolution, at the frame rate
    lstm: Any  # torch.nn.LSTM inside EncodecLSTM (whose forward adds the input back)
    tail: list[Any]  # ELU / transposed convolutions / residual blocks / last convolution
    hop: int  # samples per frame


def staged_decoder(encodec) -> _StagedDecoder | None:
    """Split transformers' ``EncodecModel`` decoder for chunked decoding, or None if it is not laid out as expected.

    The SEANet decoder is ``conv → LSTM → (ELU, transposed conv, residual block) × 4 → ELU → conv``.
    Everything after the LSTM is convolutional and reaches only a couple of frames
    to each side, so windows of frames with a little context on each side decode to
    the same samples as the whole track. The LSTM is not local (its state carries
    the whole past), so it runs over the whole track at the frame rate, in time
    slices that hand their state on, which is exact too. A layout we do not
    recognise (another transformers version, a group-normalised or chunked 48 kHz
    model) returns None and is decoded in one call, as before.
    """
    import torch.nn as nn
    from torch.nn.utils import parametrize

    try:
        from transformers.models.encodec import modeling_encodec as me
    except ImportError:  # pragma: no cover - transformers always ships EnCodec
        return None
    layers = getattr(getattr(encodec, "decoder", None), "layers", None)
    config = getattr(encodec, "config", None)
    if layers is None or config is None or getattr(config, "chunk_length", None) is not None or len(layers) < 3:
        return None
    if not isinstance(layers[1], me.EncodecLSTM) or type(layers[1]).forward is not me.EncodecLSTM.forward:
        return None
    lstm = layers[1].lstm
    if not isinstance(lstm, nn.LSTM) or lstm.batch_first or lstm.bidirectional or lstm.proj_size:
        return None
    local_in_time = (
        me.EncodecConv1d, me.EncodecConvTranspose1d, me.EncodecResnetBlock,
        nn.Conv1d, nn.ConvTranspose1d, nn.ELU, nn.Identity, nn.ModuleList, nn.ModuleDict,
        parametrize.ParametrizationList,
    )  # fmt: skip
    for module in nn.ModuleList(layers[2:]).modules():
        # weight norm recomputes the weight from its parts: no state across time either
        if not (isinstance(module, local_in_time) or type(module).__name__ == "_WeightNorm"):
            return None
    ratios = getattr(config, "upsampling_ratios", None)
    if not ratios:
        return None
    hop = 1
    for r in ratios:
        hop *= int(r)
    return _StagedDecoder(head=layers[0], lstm=lstm, tail=list(layers[2:]), hop=hop)


def decode_take(
    encodec,
    codes,
    *,
    chunk_frames: int = DECODE_CHUNK_FRAMES,
    context_frames: int = DECODE_CONTEXT_FRAMES,
):
    """Decode one take's ``[1, K, T]`` codes to float32 ``[1, C, T × hop]`` on the CPU, in bounded memory.

    Stages (see :func:`staged_decoder`): codebook lookup and the first convolution
    over the whole track (``[1, D, T]`` at 50 Hz: a few hundred MB for 600 s); the
    LSTM in slices of ``chunk_frames`` that pass their state on; then the
    upsampling layers on frames ``[a - context, b + context)`` for each window
    ``[a, b)``, keeping only the samples of ``[a, b)``. At the ends of the track
    the window stops at the edge, so the layers pad it exactly as they pad the
    whole track. Output goes straight to a CPU buffer, so a GPU holds one window.
    """
    import torch

    if chunk_frames < 1 or context_frames < 0:
        raise ValueError(f"chunk_frames must be >= 1 and context_frames >= 0, got {chunk_frames}, {context_frames}")
    staged = staged_decoder(encodec)
    if staged is None:
        return encodec.decode(codes[None], audio_scales=[None]).audio_values.float().cpu()
    total = codes.shape[-1]
    embeddings = encodec.quantizer.decode(codes.transpose(0, 1))  # [1, D, T]
    seq = staged.head(embeddings).permute(2, 0, 1)  # [T, 1, C], the LSTM's layout
    del embeddings
    hidden = torch.empty_like(seq)
    state = None
    for a in range(0, total, chunk_frames):
        piece = seq[a : a + chunk_frames]
        out, state = staged.lstm(piece, state)
        torch.add(out, piece, out=hidden[a : a + chunk_frames])  # EncodecLSTM's skip connection
    del seq, out
    hidden = hidden.permute(1, 2, 0)  # [1, C, T]
    audio = None
    for a in range(0, total, chunk_frames):
        b = min(a + chunk_frames, total)
        lo, hi = max(0, a - context_frames), min(total, b + context_frames)
        x = hidden[..., lo:hi]
        for layer in staged.tail:
            x = layer(x)
        if x.shape[-1] != (hi - lo) * staged.hop:
            raise GenerationError(
                f"EnCodec returned {x.shape[-1]} samples for {hi - lo} frames (expected {staged.hop} a frame); "
                "this is a bug, please report it"
            )
        if audio is None:
            audio = torch.empty((x.shape[0], x.shape[1], total * staged.hop), dtype=torch.float32)
        audio[..., a * staged.hop : b * staged.hop] = x[..., (a - lo) * staged.hop : (b - lo) * staged.hop]
    return audio


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
