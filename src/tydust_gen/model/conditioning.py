"""Text conditioning: prompts → T5 hidden states (with the empty prompt for classifier-free guidance), once per track."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from tydust_gen.base import memory
from tydust_gen.model.loading import LoadedModel


@dataclass(frozen=True)
class Conditioning:
    """Text conditioning for a batch of B prompts, computed once per track.

    Attributes:
        hidden: ``[B', L, D]`` encoder states already projected to the decoder
            width and masked; with guidance, B' = 2B and the second half is the
            all-zero unconditional input.
        mask: ``[B', L]`` attention mask (int64, 1 = real token).
        batch_size: B, the number of prompts/takes.
        guidance_scale: the CFG weight the hidden states were built for.
        texts: the prompts, one per take (what the hidden states say).
    """

    hidden: Any
    mask: Any
    batch_size: int
    guidance_scale: float
    texts: tuple[str, ...] = ()

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    def takes(self, start: int, stop: int) -> Conditioning:
        """The conditioning of takes ``start..stop-1`` alone (a smaller batch), rows copied exactly.

        With guidance the unconditional half follows the conditional one, so take i
        has rows i and B + i.
        """
        import torch

        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"takes {start}..{stop} of a batch of {self.batch_size}")
        rows = torch.arange(start, stop, device=self.hidden.device)
        if self.guided:
            rows = torch.cat([rows, rows + self.batch_size])
        return Conditioning(
            hidden=self.hidden[rows], mask=self.mask[rows], batch_size=stop - start, guidance_scale=self.guidance_scale,
            texts=self.texts[start:stop],
        )


def encode_text(loaded: LoadedModel, prompts: list[str], guidance_scale: float) -> Conditioning:
    """Run the T5 encoder once for ``prompts`` and build the (guided) conditioning.

    The result equals what ``MusicgenForConditionalGeneration.forward`` feeds the
    decoder's cross-attention: projected to the decoder width, multiplied by the
    mask, and with guidance an all-zero unconditional half appended.

    Returns:
        :class:`Conditioning` with ``hidden`` of shape ``[B or 2B, L, D_dec]``.

    Raises:
        GenerationError: memory ran out (one line, with what to do).
    """
    import torch

    model = loaded.model
    inputs = loaded.processor(text=prompts, padding=True, return_tensors="pt")
    ids = inputs["input_ids"].to(loaded.device)
    mask = inputs["attention_mask"].to(loaded.device)
    with memory.translated("encoding the prompt"), torch.inference_mode():
        hidden = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        if (
            model.text_encoder.config.hidden_size != model.decoder.config.hidden_size
            # a melody decoder's config has no such field (it projects whenever the widths differ)
            and getattr(model.decoder.config, "cross_attention_hidden_size", None) is None
        ):
            hidden = model.enc_to_dec_proj(hidden)
        hidden = hidden * mask[..., None].to(hidden.dtype)
        if guidance_scale > 1.0:
            hidden = torch.cat([hidden, torch.zeros_like(hidden)], dim=0)
            mask = torch.cat([mask, torch.zeros_like(mask)], dim=0)
    return Conditioning(hidden=hidden, mask=mask, batch_size=len(prompts), guidance_scale=guidance_scale, texts=tuple(prompts))


@dataclass(frozen=True)
class SectionConditioning:
    """The conditioning of one section of a track: from ``start_s`` on, windows see ``cond`` and sample with ``sampling``."""

    start_s: float
    cond: Conditioning
    sampling: Any  # SamplingSettings (its guidance_scale may be the section's own)


def token_count(loaded: LoadedModel, prompt: str) -> tuple[int, int | None]:
    """``(tokens in prompt, tokenizer's maximum or None)`` so truncation can be reported, not silent."""
    tok = loaded.processor.tokenizer
    n = len(tok(prompt)["input_ids"])
    limit = getattr(tok, "model_max_length", None)
    if limit is not None and limit > 1_000_000:
        limit = None
    return n, limit
