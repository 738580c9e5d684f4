"""Out of memory, recognised and turned into one line that says what to do.

torch reports a failed allocation as ``torch.cuda.OutOfMemoryError`` on a GPU and as a
plain ``RuntimeError`` on the CPU ("DefaultCPUAllocator: can't allocate memory");
numpy and Python raise ``MemoryError``. Each stage that allocates a lot (loading,
conditioning, generation, EnCodec decode, resampling) wraps itself in
:func:`translated` so the user sees which stage ran out and what to change, never
a traceback. torch is imported lazily: ``base`` must not pull it in.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from tydust_gen.base.errors import GenerationError, TydustError

# What torch and the C library say when an allocation fails, lower case.
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate")

GPU_ADVICE = "close other programs using the GPU or use --device cpu"
CPU_ADVICE = "close other programs or use a shorter --duration"


def is_out_of_memory(exc: BaseException) -> bool:
    """True for torch's and Python's out-of-memory errors (CUDA, CPU allocator, numpy)."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(marker in str(exc).lower() for marker in _OOM_MARKERS)


def on_gpu(exc: BaseException) -> bool:
    """Whether an out-of-memory error came from a GPU (torch's CUDA error, or its message names CUDA)."""
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "cuda" in str(exc).lower()


def out_of_memory_error(
    exc: BaseException,
    doing: str,
    *,
    error: type[TydustError] = GenerationError,
    gpu_advice: str = GPU_ADVICE,
    cpu_advice: str = CPU_ADVICE,
) -> TydustError:
    """The one-line ``error`` for an out-of-memory ``exc`` raised while ``doing`` (e.g. "decoding the audio")."""
    if on_gpu(exc):
        return error(f"the GPU ran out of memory while {doing}; {gpu_advice}")
    return error(f"the computer ran out of memory while {doing}; {cpu_advice}")


@contextlib.contextmanager
def translated(doing: str, **options) -> Iterator[None]:
    """Turn an out-of-memory error raised in the block into :func:`out_of_memory_error`; others pass as they are.

    The GPU's cache is emptied first, so what the failed stage held is given back
    before anything (a smaller batch, the next track) runs.
    """
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        release_cached_memory()
        raise out_of_memory_error(exc, doing, **options) from exc


def release_cached_memory() -> None:
    """Hand the CUDA caching allocator's free blocks back after a failed allocation (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
