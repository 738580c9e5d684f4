"""A tiny, randomly initialised MusicGen saved in the real on-disk layout.

Nothing here downloads. The model has the same architecture family as
``facebook/musicgen-small`` (T5 text encoder, 4-codebook decoder, 32 kHz EnCodec
at 50 frames per second) but a few thousand times fewer weights, so the test
suite and ``tydust-gen doctor --selftest`` can run the whole pipeline, loading
through ``from_pretrained`` exactly like a real checkpoint.

Its audio is noise with a large DC offset that changes with the tokens; only
its *shape* (sample rate, frame rate, lengths) matches the real model.
"""

from __future__ import annotations

import string
from pathlib import Path

#: Codebook size of the tiny model; >= 250 so the studio's top_k=250 is valid.
TINY_CODEBOOK_SIZE = 256
#: EnCodec hop of the real 32 kHz model: 8*5*4*4 = 640 samples -> 50 frames/s.
TINY_UPSAMPLING_RATIOS = [8, 5, 4, 4]
TINY_SAMPLE_RATE = 32_000  # Hz, same as musicgen-small
TINY_MAX_POSITIONS = 2048  # decoder positions, as musicgen-small (sinusoidal: no weights)
TINY_MAX_PROMPT_TOKENS = 512  # tokens, the model_max_length of the real T5 tokenizer
TINY_CODEC_CODEBOOKS = 4  # EnCodec codebooks per channel, as the 32 kHz EnCodec of musicgen-small
TINY_MELODY_TEXT_WIDTH = 24  # T5 width of the tiny melody model (its decoder is 32 wide)
TINY_MELODY_PROJ_STD = 1.0  # std of the melody model's chroma → decoder projection weights (see build_tiny_model)
TINY_MELODY_HEAD_GAIN = 30.0  # factor on the melody model's output heads, so its logits are not near-flat


def _vocab() -> list[tuple[str, float]]:
    """A small sentencepiece-style vocabulary: specials, characters, a few words."""
    pieces = ["<pad>", "</s>", "<unk>"]
    pieces += ["\u2581" + w for w in ("dark", "wave", "synth", "bass", "calm", "menu", "music", "intense")]
    pieces += ["\u2581" + c for c in string.ascii_lowercase]
    pieces += list(string.ascii_letters + string.digits + string.punctuation)
    pieces.append("\u2581")
    seen: dict[str, None] = {}
    for p in pieces:
        seen.setdefault(p, None)
    return [(p, 0.0 if i < 3 else -float(i)) for i, p in enumerate(seen)]


def build_tiny_model(seed: int = 0, *, stereo: bool = False, melody: bool = False):
    """Build a tiny random ``MusicgenForConditionalGeneration`` and its processor.

    Args:
        seed: torch seed of the random weights.
        stereo: the layout of ``facebook/musicgen-stereo-small``: a decoder with
            ``audio_channels=2`` and 8 codebooks (left, right, left, ... interleaved)
            over the same mono 4-codebook EnCodec, which decodes each channel alone.
        melody: the layout of ``facebook/musicgen-melody``: a
            ``MusicgenMelodyForConditionalGeneration`` (its decoder reads the chroma and the
            text prepended to the audio tokens, no cross-attention) with a
            ``MusicgenMelodyProcessor``, whose feature extractor has the real chroma settings.

    Returns:
        ``(model, processor)``; the model is in eval mode, fp32, on the CPU.
    """
    import torch
    from transformers import (
        EncodecConfig,
        EncodecFeatureExtractor,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        MusicgenMelodyConfig,
        MusicgenMelodyDecoderConfig,
        MusicgenMelodyFeatureExtractor,
        MusicgenMelodyForConditionalGeneration,
        MusicgenMelodyProcessor,
        MusicgenProcessor,
        T5Config,
        T5Tokenizer,
    )

    if stereo and melody:
        raise ValueError("the tiny melody model is mono, as facebook/musicgen-melody is")

    # model_max_length as the real t5-base tokenizer of musicgen-small, so over-long prompts are refused in tests too.
    tokenizer = T5Tokenizer(vocab=_vocab(), extra_ids=0, model_max_length=TINY_MAX_PROMPT_TOKENS)
    text_cfg = T5Config(
        vocab_size=len(tokenizer),
        # the melody model's T5 is narrower than its decoder, as in facebook/musicgen-melody (768 → 1536),
        # so its text goes through enc_to_dec_proj
        d_model=TINY_MELODY_TEXT_WIDTH if melody else 32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    audio_cfg = EncodecConfig(
        sampling_rate=TINY_SAMPLE_RATE,
        audio_channels=1,
        hidden_size=16,
        num_filters=4,
        num_residual_layers=1,
        upsampling_ratios=TINY_UPSAMPLING_RATIOS,
        codebook_size=TINY_CODEBOOK_SIZE,
        codebook_dim=16,
        num_lstm_layers=1,
        # 4 codebooks x 8 bits (256 codes) x 50 Hz: encode() then gives the decoder's 4 codebooks per
        # channel, as 2.2 kbps (4 x 11 bits x 50 Hz) does for the real EnCodec of musicgen-small
        target_bandwidths=[TINY_CODEC_CODEBOOKS * 8 * 50 / 1000],
        use_conv_shortcut=False,
        normalize=False,
    )
    decoder_class = MusicgenMelodyDecoderConfig if melody else MusicgenDecoderConfig
    decoder_cfg = decoder_class(
        vocab_size=TINY_CODEBOOK_SIZE,
        max_position_embeddings=TINY_MAX_POSITIONS,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=4,
        hidden_size=32,
        num_codebooks=TINY_CODEC_CODEBOOKS * (2 if stereo else 1),
        pad_token_id=TINY_CODEBOOK_SIZE,
        bos_token_id=TINY_CODEBOOK_SIZE,
        audio_channels=2 if stereo else 1,
    )
    torch.manual_seed(seed)
    if melody:
        # num_chroma and chroma_length keep the real defaults (12 bins, 235 frames = 30 s at 32 kHz / 4096)
        config = MusicgenMelodyConfig(text_encoder=text_cfg, audio_encoder=audio_cfg, decoder=decoder_cfg)
        model = MusicgenMelodyForConditionalGeneration(config).eval()
    else:
        config = MusicgenConfig(text_encoder=text_cfg, audio_encoder=audio_cfg, decoder=decoder_cfg)
        model = MusicgenForConditionalGeneration(config).eval()
    # EnCodec's codebooks are buffers that start at zero (they are learned by k-means
    # in training); left so, every code decodes to the same vector and the audio would
    # not depend on the tokens at all. Random codebooks make different tokens sound different.
    with torch.no_grad():
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_(0.0, 1.0)
            layer.codebook.embed_avg.copy_(layer.codebook.embed)
            layer.codebook.cluster_size.fill_(1.0)
        if melody:
            # At the init scale (std 0.02) the chroma moves the logits by ~1e-4 and the near-flat
            # distributions sample the same tokens whatever the melody. A unit-scale chroma projection
            # and sharper output heads let the melody reach the sampled tokens, as it does in the real model.
            model.audio_enc_to_dec_proj.weight.normal_(0.0, TINY_MELODY_PROJ_STD)
            for head in model.decoder.lm_heads:
                head.weight.mul_(TINY_MELODY_HEAD_GAIN)
    gen = model.generation_config
    gen.decoder_start_token_id = TINY_CODEBOOK_SIZE
    gen.pad_token_id = TINY_CODEBOOK_SIZE
    gen.bos_token_id = TINY_CODEBOOK_SIZE
    gen.do_sample = True
    gen.guidance_scale = 3.0
    gen.max_length = TINY_MAX_POSITIONS
    if melody:
        chroma = MusicgenMelodyFeatureExtractor(sampling_rate=TINY_SAMPLE_RATE)  # the real n_fft, hop and bins
        return model, MusicgenMelodyProcessor(feature_extractor=chroma, tokenizer=tokenizer)
    feature_extractor = EncodecFeatureExtractor(feature_size=1, sampling_rate=TINY_SAMPLE_RATE)
    processor = MusicgenProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    return model, processor


def save_tiny_model(directory: str | Path, seed: int = 0, *, stereo: bool = False, melody: bool = False) -> Path:
    """Build the tiny model and save model + processor with ``save_pretrained``.

    The directory then loads like a downloaded ``facebook/musicgen-small``
    (``stereo``: ``facebook/musicgen-stereo-small``; ``melody``: ``facebook/musicgen-melody``)
    snapshot: ``tydust-gen TRACK --model DIR``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_model(seed, stereo=stereo, melody=melody)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
