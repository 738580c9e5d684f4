"""Our sampling settings as transformers' ``generate`` keyword arguments (shared by every backend)."""

from __future__ import annotations

from typing import Any

from tydust_gen.base.settings import SamplingSettings
from tydust_gen.model.loading import LoadedModel


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
