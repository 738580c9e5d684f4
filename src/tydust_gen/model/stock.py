"""The ``stock`` backend: transformers' own decoder ``generate`` for one window (eager, dynamic KV cache).

The reference every faster backend is compared against, token for token. With
fp16/bf16 decoder weights it runs under :func:`autocast` (as audiocraft runs its
language model), so the fp32 text conditioning meets the decoder's weights and
layer norms and softmax compute in fp32 where torch's autocast lists say so.
Non-finite logits stop the take (:class:`_FiniteScores`).

A melody model (:mod:`tydust_gen.model.melody`) runs through its decoder's own
``generate`` too, with the prepended conditioning put in place by
:func:`_melody_inputs`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

from tydust_gen.base.errors import GenerationError
from tydust_gen.model.conditioning import Conditioning
from tydust_gen.model.sampling import sampling_kwargs


def autocast(loaded):
    """A context in which transformers' decoder runs in the loaded compute dtype (off for fp32)."""
    import torch

    dtype = loaded.model.decoder.lm_heads[0].weight.dtype
    return torch.autocast(loaded.device.type, dtype=dtype, enabled=dtype != torch.float32)


class _FiniteScores:
    """A logits processor that notes NaN/inf scores and hands on finite ones (see fast._FiniteGuard)."""

    def __init__(self):
        self.seen = None

    def __call__(self, input_ids, scores):
        import torch

        bad = ~torch.isfinite(scores).all()
        self.seen = bad if self.seen is None else (self.seen | bad)
        return torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)

    def check(self) -> None:
        if self.seen is not None and bool(self.seen):
            raise GenerationError(
                "the model produced non-finite logits (NaN or inf) while generating; nothing was written "
                "for this take. Try --dtype fp32"
            )


class _StepHook:
    """A StoppingCriteria that never stops and reports each step (generate's streamer sees only one put)."""

    def __init__(self, on_step: Callable[[], None]):
        self.on_step = on_step

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.on_step()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


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


@contextlib.contextmanager
def _melody_inputs(decoder, states):
    """While ``decoder.generate`` runs: feed it the whole guided conditioning ``states`` as transformers' top-level generate does.

    ``MusicgenMelodyForCausalLM.prepare_inputs_for_generation`` (transformers 5) builds
    the unconditional rows as zeros, where ``MusicgenMelodyForConditionalGeneration.generate``
    gives them the null melody (:func:`~tydust_gen.model.melody.melody_conditioning`), and it
    hands the decoder a self-attention mask without the prepended positions, which shifts
    the causal mask once the cache holds them. Each step's inputs are therefore taken as
    transformers builds them, with ``states`` in place of its conditioning and no mask
    (all prepended positions and all earlier tokens are attended, as in the top-level
    generate). Verified token for token against that generate in tests/test_melody.py.
    """

    original = decoder.prepare_inputs_for_generation

    @functools.wraps(original)  # generate() validates its kwargs against this signature
    def prepare(*args, **kwargs):
        inputs = original(*args, **kwargs)
        if inputs.get("encoder_hidden_states") is not None:  # the first step only (then they are cached)
            inputs["encoder_hidden_states"] = states
        inputs["attention_mask"] = None
        return inputs

    decoder.prepare_inputs_for_generation = prepare
    try:
        yield
    finally:
        del decoder.prepare_inputs_for_generation


def _window_ids(loaded, batch: int, prefix):
    """``(ids, P)``: the start token then the ``P`` prefix frames, one row per take and codebook."""
    import torch

    k = loaded.num_codebooks
    start = loaded.model.generation_config.decoder_start_token_id
    ids = torch.full((batch * k, 1), start, dtype=torch.long, device=loaded.device)
    if prefix is None:
        return ids, 0
    p = int(prefix.shape[-1])
    return torch.cat([ids, prefix.reshape(batch * k, p).to(loaded.device)], dim=-1), p


def _decoder_generate_kwargs(loaded, new_frames: int, sampling, on_step, finite: _FiniteScores) -> dict:
    """What both kinds of window pass to the decoder's ``generate`` besides their inputs: length, special
    tokens, the per-step hook, the finite-logits check and the sampling settings."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    gen_cfg = loaded.model.generation_config
    return dict(
        max_new_tokens=new_frames + loaded.delay_codebooks - 1,
        pad_token_id=gen_cfg.pad_token_id,
        bos_token_id=gen_cfg.bos_token_id,
        decoder_start_token_id=gen_cfg.decoder_start_token_id,
        num_return_sequences=1,
        use_cache=True,
        stopping_criteria=StoppingCriteriaList([_StepHook(on_step)]),
        logits_processor=LogitsProcessorList([finite]),
        **sampling_kwargs(loaded, sampling),
    )


class StockBackend:
    """transformers' own decoder ``generate`` (eager, dynamic KV cache)."""

    name = "stock"

    def generate_window(self, loaded, cond, prefix, new_frames, sampling, on_step):
        import torch
        from transformers import DynamicCache, EncoderDecoderCache

        if loaded.family == "melody":
            return self._melody_window(loaded, cond, prefix, new_frames, sampling, on_step)
        model = loaded.model
        start = model.generation_config.decoder_start_token_id
        b = cond.batch_size
        ids, p = _window_ids(loaded, b, prefix)
        # The decoder's self-attention mask is per take ([B, seq]), not per codebook row;
        # left to itself, generate() would infer one from ids (the start token equals
        # the pad token) with the wrong shape.
        self_mask = torch.ones((b, p + 1), dtype=torch.long, device=loaded.device)
        # Self- and cross-attention need separate caches; decoder.generate alone
        # would make one DynamicCache and mix the text keys into the audio keys.
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        finite = _FiniteScores()
        with autocast(loaded):
            if p:
                _prefill_context(model, cache, ids, cond, start, p)
            out = model.decoder.generate(
                input_ids=ids,
                cache=cache,
                attention_mask=self_mask,
                encoder_hidden_states=cond.hidden,
                encoder_attention_mask=cond.mask,
                **_decoder_generate_kwargs(loaded, new_frames, sampling, on_step, finite),
            )
        finite.check()
        return out[:, :, p:]

    def _melody_window(self, loaded, cond, prefix, new_frames, sampling, on_step):
        """One window of a melody model: ``cond`` holds the prepended chroma + text states ([B'] rows, guided pairs)."""
        import torch

        model = loaded.model
        b = cond.batch_size
        ids, p = _window_ids(loaded, b, prefix)
        finite = _FiniteScores()
        # No cache is handed in: the prefill then runs the conditioning, the start token and the
        # whole prefix at once (this decoder's prepare_inputs slices by the cache's length).
        with autocast(loaded), _melody_inputs(model.decoder, cond.hidden):
            out = model.decoder.generate(
                input_ids=ids,
                # the conditional rows; _melody_inputs puts the guided pair in their place
                encoder_hidden_states=cond.hidden[:b],
                # per take, as generate() tracks it; not handed to the decoder (see _melody_inputs)
                attention_mask=torch.ones((b, p + 1), dtype=torch.long, device=loaded.device),
                **_decoder_generate_kwargs(loaded, new_frames, sampling, on_step, finite),
            )
        finite.check()
        return out[:, :, p:]
