"""Model stage: find, load and condition MusicGen through 🤗 transformers.

The model is named by a hub id (``facebook/musicgen-small``, resolved through the
Hugging Face cache, honouring ``HF_HUB_OFFLINE``) or by a local directory holding
a ``save_pretrained`` snapshot. It loads once per command and is reused for every
track.

Precision follows audiocraft's split: the T5 text encoder and EnCodec run once per
track and stay in fp32; the decoder's weights are in the compute dtype chosen by
``--dtype`` (:func:`resolve_dtype`: bf16 on a GPU that supports it, else fp16 on
CUDA; fp32 on the CPU). The decode loops keep the residual stream, layer norms
and softmax in fp32 (:mod:`tydust_gen.model.fast`; the stock backend runs under
autocast).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tydust_gen.base import memory
from tydust_gen.base.errors import DeviceError, ModelError, SettingsError

DEFAULT_MODEL = "facebook/musicgen-small"


DEVICE_CHOICES = ("auto", "cuda", "cpu")
#: ``--dtype`` values; "auto" picks bf16 on a bf16-capable GPU, else fp16 on CUDA, fp32 on the CPU.
DTYPE_CHOICES = ("auto", "fp16", "bf16", "fp32")
#: Decoder ``audio_channels`` we can run: mono, and stereo (left/right codebooks interleaved).
SUPPORTED_AUDIO_CHANNELS = (1, 2)
#: config.json ``model_type`` of the melody checkpoints (facebook/musicgen-melody, -melody-large).
MELODY_MODEL_TYPE = "musicgen_melody"


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


@dataclass(frozen=True)
class ModelSource:
    """Where the weights come from.

    Attributes:
        ref: what the user gave (hub id or path).
        local_dir: the directory to load from, when it is a local snapshot.
        hub_id: the hub repository id, when loading through the HF cache.
    """

    ref: str
    local_dir: Path | None
    hub_id: str | None


@dataclass
class LoadedModel:
    """A MusicGen ready to generate, with the facts the later stages need.

    Attributes:
        model: ``MusicgenForConditionalGeneration`` (``MusicgenMelodyForConditionalGeneration`` for the
            melody family) in eval mode on ``device``.
        processor: the matching ``MusicgenProcessor`` (tokenizer); ``MusicgenMelodyProcessor`` for
            the melody family, whose feature extractor computes the chroma.
        device: torch device it runs on.
        dtype: the decoder's compute dtype (T5 and EnCodec are fp32).
        source: where it was loaded from.
        sample_rate: EnCodec output rate, Hz (32,000 for musicgen-small).
        frame_rate: codec frames per second (50 for musicgen-small).
        num_codebooks: parallel token streams per frame (4; 8 for stereo: left/right interleaved).
        codebook_size: tokens per codebook (2048).
        max_positions: longest decoder sequence, frames + delay + start token.
        audio_channels: channels the decoder's codebooks carry (1, or 2 for the stereo checkpoints,
            whose codebooks alternate left, right, left, ... and decode through EnCodec one channel at a time).
        family: ``"mono"``, ``"stereo"`` or ``"melody"``, for tags, ``--json`` and the record.
            A melody model's decoder reads the chroma and the text prepended to the audio tokens
            (no cross-attention); see :mod:`tydust_gen.model.melody`.
    """

    model: Any
    processor: Any
    device: Any
    dtype: Any
    source: ModelSource
    sample_rate: int
    frame_rate: int
    num_codebooks: int
    codebook_size: int
    max_positions: int
    audio_channels: int = 1
    family: str = "mono"

    @property
    def delay_codebooks(self) -> int:
        """Codebooks per channel: the delay pattern's depth (a stereo pair shares one delay)."""
        return self.num_codebooks // self.audio_channels

    @property
    def max_window_frames(self) -> int:
        """Most frames one window may hold: positions minus the start token and the codebook delay."""
        return self.max_positions - self.delay_codebooks


def offline_mode() -> bool:
    """True when the user asked the Hugging Face libraries not to touch the network."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"}:
            return True
    return False


def resolve_source(ref: str) -> ModelSource:
    """Classify ``ref`` as a local snapshot directory or a hub id, without loading anything.

    Raises:
        ModelError: a path that exists but is not a MusicGen snapshot, or a hub
            id that is not cached while offline.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model directory {ref} has no config.json; point --model at a folder saved with save_pretrained"
            )
        return ModelSource(ref=ref, local_dir=path.resolve(), hub_id=None)
    if path.exists():
        raise ModelError(f"model path {ref} is not a directory; pass a snapshot folder or a hub id such as {DEFAULT_MODEL}")
    if ref.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(ref):
        raise ModelError(
            f"model {ref!r} is neither an existing directory nor a hub id like {DEFAULT_MODEL}; check the --model value"
        )
    if offline_mode() and not is_cached(ref):
        raise ModelError(
            f"model {ref} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"download it once with `hf download {ref}` on a connected machine, or pass --model DIR"
        )
    return ModelSource(ref=ref, local_dir=None, hub_id=ref)


def peek_family(source: ModelSource) -> str | None:
    """The family a snapshot will load as, read from its config.json without loading any weights.

    Lets a run refuse a melody on a model without melody support (and pick the backend a
    melody model needs) in a second, before the weights load. None when the config cannot
    be read here (a hub id not downloaded yet): :func:`load_model` then tells.
    """
    config_file: str | os.PathLike[str] | None = None
    if source.local_dir is not None:
        config_file = source.local_dir / "config.json"
    elif source.hub_id is not None:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - transformers always brings it
            return None
        found = try_to_load_from_cache(source.hub_id, "config.json")
        config_file = found if isinstance(found, str) else None
    if config_file is None:
        return None
    try:
        config = json.loads(Path(config_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    decoder = config.get("decoder") if isinstance(config.get("decoder"), dict) else {}
    return model_family(int(decoder.get("audio_channels", 1) or 1), melody=config.get("model_type") == MELODY_MODEL_TYPE)


def is_cached(hub_id: str) -> bool:
    """Whether the HF cache holds a snapshot of ``hub_id`` (its config.json at least)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers always brings it
        return False
    found = try_to_load_from_cache(hub_id, "config.json")
    return isinstance(found, str)


def resolve_device(name: str):
    """Map ``auto|cuda|cpu`` (or ``cuda:N``) to a torch device, failing before the model loads.

    Returns:
        ``(torch.device, fell_back_to_cpu)`` where the flag is True when ``auto`` found no GPU.
    """
    import torch

    choice = name.strip().lower()
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), False
        return torch.device("cpu"), True
    if choice == "cpu":
        return torch.device("cpu"), False
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
        try:
            device = torch.device(choice)
        except RuntimeError:
            raise SettingsError(f"device {name!r} is not valid; use auto, cuda, cuda:N or cpu") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{choice} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device, False
    raise SettingsError(f"unknown device {name!r}; use auto, cuda, cuda:N or cpu")


def check_dtype_name(name: str) -> str:
    """``name`` normalised ("auto", "fp16", "bf16" or "fp32").

    Raises:
        SettingsError: any other name.
    """
    choice = str(name).strip().lower()
    if choice not in DTYPE_CHOICES:
        raise SettingsError(f"unknown --dtype {name!r}; use one of: {', '.join(DTYPE_CHOICES)}")
    return choice


def resolve_dtype(name: str, device) -> Any:
    """Map ``auto|fp16|bf16|fp32`` to the decoder's compute dtype on ``device``, before the model loads.

    fp16 and bf16 are allowed on the CPU (torch runs them there, slower than fp32 on most CPUs;
    the tests use them to check the reduced-precision math without a GPU).

    Raises:
        SettingsError: an unknown name.
        DeviceError: bf16 asked for on a GPU without bf16 support.
    """
    import torch

    choice = check_dtype_name(name)
    table = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if choice == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if cuda_bf16(device) else torch.float16
    if choice == "bf16" and device.type == "cuda" and not cuda_bf16(device):
        raise DeviceError(f"{device} does not support bf16; use --dtype fp16 or auto")
    return table[choice]


def cuda_bf16(device) -> bool:
    """Whether the GPU ``device`` runs bf16 natively, not through emulation.

    NVIDIA: compute capability 8.0 (Ampere) and later, the test torch's own
    ``is_bf16_supported(including_emulation=False)`` makes for the current device;
    asked per device here so ``cuda:N`` is judged by its own card.
    """
    import torch

    if getattr(torch.version, "hip", None):  # pragma: no cover - ROCm decides for itself
        return bool(torch.cuda.is_bf16_supported())
    return tuple(torch.cuda.get_device_capability(device)) >= (8, 0)


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` → ``"bf16"`` (the ``--dtype`` spelling, as the provenance records it)."""
    return {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}.get(str(dtype), str(dtype))


def quiet_transformers() -> None:
    """Silence transformers' and the hub's own progress bars and config warnings.

    The musicgen config warns that pad_token_id lies outside the vocabulary for
    the real checkpoint too; it is harmless and would only confuse users.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
        from huggingface_hub.utils import logging as hub_logging

        disable_progress_bars()
        # Its retry chatter ("Retrying in 2s...") would bury our one-line error when offline.
        hub_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


@contextlib.contextmanager
def hub_download_progress(show: bool):
    """While the model loads: huggingface_hub's download bars on (``show``) or off; off afterwards.

    The first run of a hub id downloads ~2.4 GB; with every bar silenced it looks
    hung. The hub's bars are tqdm on stderr and hide themselves when stderr is not
    a terminal; the caller decides whether anyone is watching (the CLI: a terminal
    and no ``--quiet``). ``HF_HUB_DISABLE_PROGRESS_BARS`` set by the user wins.
    """
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    except ImportError:  # pragma: no cover - transformers always brings it
        yield
        return
    forced = constants.HF_HUB_DISABLE_PROGRESS_BARS  # True / False from the environment, None when unset
    if show and forced is None:
        enable_progress_bars()
    try:
        yield
    finally:
        if forced is None:
            disable_progress_bars()


def out_of_memory_while_loading():
    """Out of memory while the weights load or move to the device: a :class:`ModelError` (exit 3), one line."""
    return memory.translated("loading the model", error=ModelError, cpu_advice="close other programs and try again")


def load_model(source: ModelSource, device, *, dtype=None, show_download_progress: bool = False) -> LoadedModel:
    """Load model and processor from ``source`` onto ``device``.

    Args:
        source: from :func:`resolve_source`.
        device: torch device from :func:`resolve_device`.
        dtype: the decoder's compute dtype (:func:`resolve_dtype`); default ``auto``'s choice.
            T5, the text projection and EnCodec always stay fp32.
        show_download_progress: let huggingface_hub draw its download progress bars
            on stderr while a hub id downloads (the core is silent otherwise).

    Raises:
        ModelError: the snapshot is missing, incomplete or not a MusicGen, or memory ran out.
    """
    import torch
    from transformers import (
        AutoConfig,
        MusicgenForConditionalGeneration,
        MusicgenMelodyForConditionalGeneration,
        MusicgenMelodyProcessor,
        MusicgenProcessor,
    )

    quiet_transformers()
    if dtype is None:
        dtype = resolve_dtype("auto", device)
    where = str(source.local_dir) if source.local_dir is not None else source.hub_id
    kwargs: dict[str, Any] = {}
    if source.hub_id is not None and offline_mode():
        kwargs["local_files_only"] = True
    try:
        with out_of_memory_while_loading(), hub_download_progress(show_download_progress):
            # The config says which family the checkpoint is: the melody models are another class
            # (chroma and text prepended to the decoder input) with another processor.
            try:
                melody = getattr(AutoConfig.from_pretrained(where, **kwargs), "model_type", None) == MELODY_MODEL_TYPE
            except (OSError, ValueError, KeyError):
                melody = False  # a broken config: the model's own from_pretrained says what is wrong, as before
            model_class = MusicgenMelodyForConditionalGeneration if melody else MusicgenForConditionalGeneration
            processor_class = MusicgenMelodyProcessor if melody else MusicgenProcessor
            model = model_class.from_pretrained(where, dtype=torch.float32, **kwargs)
            processor = processor_class.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            f"download it with `hf download {source.hub_id}` or pass --model DIR"
            if source.hub_id
            else "re-save it with save_pretrained"
        )
        raise ModelError(f"could not load model {source.ref}: {first}; {hint}") from exc
    try:
        with out_of_memory_while_loading():
            model = model.to(device)
            # Only the decoder runs per step; T5 and EnCodec run once per track and keep fp32.
            model.decoder.to(dtype)
    except RuntimeError as exc:
        raise DeviceError(f"could not move the model to {device}: {str(exc).splitlines()[0]}") from exc
    model.eval()
    return describe_model(model, processor, source=source, device=device, dtype=dtype)


def describe_model(model, processor, *, source: ModelSource, device, dtype) -> LoadedModel:
    """A loaded ``MusicgenForConditionalGeneration`` as a :class:`LoadedModel`: rates, codebooks, family from its config.

    :func:`load_model` ends here; the benchmarks build random full-size models in code and describe them
    through the same derivation.

    Raises:
        ModelError: a decoder whose audio channels tydust-gen cannot run.
    """
    audio_cfg = model.config.audio_encoder
    dec_cfg = model.config.decoder
    frame_rate = getattr(audio_cfg, "frame_rate", None)
    if frame_rate is None:  # pragma: no cover - older configs
        hop = 1
        for r in audio_cfg.upsampling_ratios:
            hop *= r
        frame_rate = audio_cfg.sampling_rate // hop
    channels = int(getattr(dec_cfg, "audio_channels", 1))
    if channels not in SUPPORTED_AUDIO_CHANNELS or dec_cfg.num_codebooks % channels:
        raise ModelError(
            f"model {source.ref} has {dec_cfg.num_codebooks} codebooks for {channels} audio channels; "
            "tydust-gen runs the mono and stereo MusicGen checkpoints"
        )
    return LoadedModel(
        model=model,
        processor=processor,
        device=device,
        dtype=dtype,
        source=source,
        sample_rate=int(audio_cfg.sampling_rate),
        frame_rate=int(frame_rate),
        num_codebooks=int(dec_cfg.num_codebooks),
        codebook_size=int(dec_cfg.vocab_size),
        max_positions=int(dec_cfg.max_position_embeddings),
        audio_channels=channels,
        family=model_family(channels, melody=getattr(model.config, "model_type", None) == MELODY_MODEL_TYPE),
    )


def model_family(audio_channels: int, *, melody: bool = False) -> str:
    """The family name a run reports: ``mono``, ``stereo`` or ``melody``."""
    if melody:
        return "melody"
    return "stereo" if audio_channels == 2 else "mono"
