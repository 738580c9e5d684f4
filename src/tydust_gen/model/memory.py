"""Memory a MusicGen run needs, estimated from the model's config before anything loads.

A run holds the weights (every parameter and buffer in the run's dtype), the
decoder's key/value cache of one window (self-attention over the window's
positions, cross-attention over the text, for 2 rows per take with guidance),
the EnCodec decode of a take (in windows: a fixed working set plus buffers that
grow slowly with the track's length) and the runtime itself. Generation and decoding
do not overlap, so the sum is on the safe side: 4.6 GB for a 90 s musicgen-small
track on the CPU, whose measured peak is 3.97 GB (docs/BENCHMARKS.md). :func:`check_fits` refuses,
with the figures, a run that would not fit the device's free memory, so
``-medium`` or ``-large`` fails in a second instead of swapping or dying in the
middle of a track; ``doctor`` lists which checkpoint sizes fit this machine.

The figures are estimates: the decode and runtime terms are measured on
musicgen-small (docs/FAMILY.md), the rest is counted exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tydust_gen.base import processes
from tydust_gen.base.errors import DeviceError

#: EnCodec decode of one take, in windows (``model/generate.py: decode_codes``): bytes per second of
#: audio for the whole-track buffers it keeps (the frame-rate embeddings and LSTM input/output, and the
#: output), and the windows' working set besides. From bench/memory_bench.py on full-size random
#: musicgen-small, CPU fp32 (docs/BENCHMARKS.md): the decode's peak over the loaded model was
#: 0.49 GiB for 90 s and 0.82 GiB for 600 s, i.e. ~0.68 MB/s plus ~0.46 GB; rounded up.
DECODE_BYTES_PER_SECOND = 700 * 1000
DECODE_WINDOWS_BYTES = 500 * 1000**2
#: torch, transformers, the tokenizer and allocator slack beside the weights: musicgen-small's
#: stock-backend peak RSS for 5 s (3.2 GB, FACTS.md) minus its fp32 weights (2.36 GB), rounded up.
RUNTIME_BYTES = 1000**3
#: Text positions assumed in the cross-attention cache (prompts are rarely longer; the tokenizer stops at 512).
TEXT_TOKENS = 256
#: Positions of one window: 30 s at 50 frames/s plus the delay and the start token, rounded up.
WINDOW_POSITIONS = 1536
#: Parameters of the T5-base text encoder, the 32 kHz EnCodec and the text projection of
#: musicgen-small (counted on bench/musicgen_small_config.json); the -medium/-large checkpoints share
#: the encoder and codec, the projection grows with the decoder width (768 × D + D).
SHARED_PARAMS = 109_628_544 + 56_884_674
TEXT_WIDTH = 768
#: Decoder shapes of the published checkpoints (hidden size, layers, feed-forward width), for ``doctor``.
KNOWN_SIZES = {"small": (1024, 24, 4096), "medium": (1536, 48, 6144), "large": (2048, 48, 8192)}
CODEBOOKS, VOCAB = 4, 2048  # mono checkpoints


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a run needs, by part.

    Attributes:
        weights: parameters and buffers in the run's dtype.
        cache: self- and cross-attention keys/values of one window, all rows.
        decode: EnCodec decoding one take of the track, plus the runtime.
    """

    weights: int
    cache: int
    decode: int

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.decode


def decoder_params(hidden: int, layers: int, ffn: int, codebooks: int, vocab: int) -> int:
    """Parameters of a MusicGen decoder: per layer self- and cross-attention (4 D² each), the
    feed-forward (2 D F) and three layer norms; K embeddings of V+1 rows, K heads, the final norm."""
    per_layer = 8 * hidden * hidden + 2 * hidden * ffn + 6 * hidden
    return layers * per_layer + codebooks * (vocab + 1) * hidden + codebooks * vocab * hidden + 2 * hidden


def count_parameters(config) -> tuple[int, int]:
    """``(floating-point elements, bytes of the rest)`` of the model ``config`` describes: parameters
    and buffers, counted on the meta device (no memory). The first take the run's dtype when it loads;
    integer buffers (positions, counters) keep their size."""
    import torch
    from transformers import MusicgenForConditionalGeneration, MusicgenMelodyForConditionalGeneration

    # a melody checkpoint has no cross-attention: counted as a plain MusicGen it would be ~30 % too big
    melody = getattr(config, "model_type", None) == "musicgen_melody"
    with torch.device("meta"):
        model = (MusicgenMelodyForConditionalGeneration if melody else MusicgenForConditionalGeneration)(config)
    floats, other = 0, 0
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            floats += t.numel()
        else:
            other += t.numel() * t.element_size()
    return floats, other


def estimate(
    *, params: int, hidden: int, layers: int, dtype_bytes: int, rows: int, duration_s: float, fixed_bytes: int = 0
) -> MemoryEstimate:
    """The memory of a run of ``params`` weights with this decoder shape.

    Args:
        rows: decoder rows per step: takes × 2 with guidance.
        duration_s: the longest track of the run (EnCodec decodes one take at a time; a stereo
            take decodes left, then right, so its peak is that of one side).
        fixed_bytes: weights whose size does not follow the dtype (integer buffers).
    """
    weights = params * dtype_bytes + fixed_bytes
    cache = 2 * layers * rows * (WINDOW_POSITIONS + TEXT_TOKENS) * hidden * dtype_bytes
    decode = int(duration_s * DECODE_BYTES_PER_SECOND) + DECODE_WINDOWS_BYTES + RUNTIME_BYTES
    return MemoryEstimate(weights, cache, decode)


def estimate_for_config(config, *, dtype_bytes: int, rows: int, duration_s: float) -> MemoryEstimate:
    """:func:`estimate` for a loaded-from-disk ``MusicgenConfig``."""
    dec = config.decoder
    floats, fixed = count_parameters(config)
    return estimate(
        params=floats, hidden=int(dec.hidden_size), layers=int(dec.num_hidden_layers),
        dtype_bytes=dtype_bytes, rows=rows, duration_s=duration_s, fixed_bytes=fixed,
    )  # fmt: skip


def estimate_known_size(size: str, *, dtype_bytes: int, rows: int = 2, duration_s: float = 30.0) -> MemoryEstimate:
    """:func:`estimate` for ``facebook/musicgen-SIZE`` (mono) without its config: for ``doctor``."""
    hidden, layers, ffn = KNOWN_SIZES[size]
    params = decoder_params(hidden, layers, ffn, CODEBOOKS, VOCAB) + SHARED_PARAMS + TEXT_WIDTH * hidden + hidden
    return estimate(params=params, hidden=hidden, layers=layers, dtype_bytes=dtype_bytes, rows=rows, duration_s=duration_s)


def available_bytes(device) -> int | None:
    """Free memory of ``device``: CUDA's free bytes, or the CPU's MemAvailable (Linux); None when unknown."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    return processes.available_memory_bytes()


def gb(n: float) -> str:
    return f"{n / 1000**3:.1f} GB"


def check_fits(need: MemoryEstimate, device, *, what: str) -> None:
    """Refuse a run whose estimate is more than the device's free memory.

    Raises:
        DeviceError: it does not fit (the figures and what to do are in the message).
    """
    free = available_bytes(device)
    if free is None or need.total <= free:
        return
    hint = "use --device cpu or a smaller model" if getattr(device, "type", "") == "cuda" else "use a smaller model or free memory"
    raise DeviceError(
        f"{what} needs about {gb(need.total)} on {device} (weights {gb(need.weights)}, cache {gb(need.cache)}, "
        f"decode {gb(need.decode)}) but {gb(free)} is free; {hint}"
    )


def config_for(source) -> Any:
    """The ``MusicgenConfig`` of a :class:`~tydust_gen.model.loading.ModelSource`, read without the weights.

    Returns None when it cannot be read (the load reports the problem with its own message).
    """
    from transformers import MusicgenConfig, MusicgenMelodyConfig

    from tydust_gen.model.loading import offline_mode, peek_family, quiet_transformers

    quiet_transformers()
    where = str(source.local_dir) if source.local_dir is not None else source.hub_id
    config_class = MusicgenMelodyConfig if peek_family(source) == "melody" else MusicgenConfig
    try:
        return config_class.from_pretrained(where, local_files_only=source.hub_id is not None and offline_mode())
    except (OSError, ValueError, KeyError):
        return None
