"""True stereo: the 8-codebook stereo MusicGen layout through both backends, EnCodec and the whole CLI.

The tiny stereo checkpoint is saved as facebook/musicgen-stereo-small is (decoder
``audio_channels=2``, codebooks left/right interleaved, one mono EnCodec) and loaded
through ``--model DIR``. transformers' own ``MusicgenForConditionalGeneration.generate``
is the reference for the delay pattern, the tokens and the decoded channels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tydust_gen.base.settings import GenerationSettings, SamplingSettings
from tydust_gen.export.loudness import decode_audio
from tydust_gen.model import cpu_kernel
from tydust_gen.model.conditioning import encode_text
from tydust_gen.model.fast import FastBackend, delay_pattern
from tydust_gen.model.generate import decode_codes, generate_codes
from tydust_gen.model.stock import StockBackend

PROMPTS = ["dark synth bass", "calm menu music with a long tail of words"]


def test_stereo_checkpoint_is_saved_in_the_real_layout_and_loads(tiny_stereo_dir, tiny_stereo):
    config = json.loads((tiny_stereo_dir / "config.json").read_text())
    assert config["decoder"]["audio_channels"] == 2 and config["decoder"]["num_codebooks"] == 8
    assert config["audio_encoder"]["audio_channels"] == 1  # one mono EnCodec decodes each side
    assert tiny_stereo.family == "stereo" and tiny_stereo.audio_channels == 2
    assert tiny_stereo.num_codebooks == 8 and tiny_stereo.delay_codebooks == 4
    assert tiny_stereo.max_window_frames == tiny_stereo.max_positions - 4


def test_stereo_delay_pattern_matches_transformers(tiny_stereo):
    torch.manual_seed(0)
    prefix = torch.randint(0, tiny_stereo.codebook_size, (2, 8, 7))
    start = tiny_stereo.model.generation_config.decoder_start_token_id
    ids = torch.cat([torch.full((2, 8, 1), start), prefix], dim=-1).reshape(16, 8)
    _, ref = tiny_stereo.model.decoder.build_delay_pattern_mask(ids, pad_token_id=start, max_length=8 + 12 + 3)  # P + 1 + N + depth - 1
    ours = delay_pattern(prefix, 2, 8, 12, start, "cpu", channels=2)
    assert torch.equal(ours.reshape(16, -1), ref)


def _stock_and_fast(loaded, settings, native=True):
    cond = encode_text(loaded, PROMPTS, settings.sampling.guidance_scale)
    stock, windows, steps = generate_codes(loaded, cond, settings, backend=StockBackend())
    seen: list[int] = []
    fast_backend = FastBackend(native=native)
    fast, _, _ = generate_codes(loaded, cond, settings, backend=fast_backend, progress=lambda d, t: seen.append(d))
    return stock, fast, windows, steps, seen, fast_backend


@pytest.mark.parametrize("native", [True, False], ids=["cpu-kernel", "torch"])
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "seeded"])
def test_stereo_fast_gives_stock_tokens_across_windows(tiny_stereo, do_sample, native):
    settings = GenerationSettings(
        duration_s=1.3, seed=11, window_s=0.6, stride_s=0.36, sampling=SamplingSettings(do_sample=do_sample)
    )
    stock, fast, windows, steps, seen, backend = _stock_and_fast(tiny_stereo, settings, native)
    assert len(windows) >= 3
    assert fast.shape == stock.shape == (2, 8, 65)
    assert torch.equal(fast, stock)
    # the delay of a stereo model is 4 (pairs share one), not 8: 65 frames + 3 per window
    assert steps == 65 + 3 * len(windows) and seen[-1] == steps
    if native and cpu_kernel.load().available:
        assert backend.prepared(tiny_stereo).native is not None  # the native kernel ran the 8-codebook model


def test_stereo_codes_and_channels_match_transformers_generate(tiny_stereo):
    """Greedy tokens and the decoded left/right equal what transformers' full generate makes of the checkpoint."""
    frames = 20
    settings = GenerationSettings(duration_s=frames / 50, seed=0, sampling=SamplingSettings(do_sample=False))
    cond = encode_text(tiny_stereo, PROMPTS, 3.0)
    codes, _, _ = generate_codes(tiny_stereo, cond, settings, backend=FastBackend())
    ours = decode_codes(tiny_stereo, codes)
    inputs = tiny_stereo.processor(text=PROMPTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        ref = tiny_stereo.model.generate(**inputs, do_sample=False, guidance_scale=3.0, max_new_tokens=frames + 3)
    assert ref.shape[:2] == (2, 2)
    for take, wave in enumerate(ours):
        assert wave.channels == 2 and wave.num_samples == frames * 640
        n = min(wave.num_samples, ref.shape[-1])
        assert torch.allclose(wave.samples[:, :n], ref[take, :, :n], atol=1e-5)
        left, right = wave.samples
        assert (left - right).abs().max() > 1e-3  # the two sides are different audio


def _channels_differ(path) -> float:
    audio = decode_audio(path)
    assert audio.shape[0] == 2
    return float(np.abs(audio[0] - audio[1]).max())


def test_cli_stereo_run_keeps_the_models_two_channels(workdir, run_cli, tiny_stereo_dir, tiny_model_dir):
    result = run_cli("game_over", "-d", "1.3", "--window", "0.6", "--stride", "0.36", "--seed", "3",
                     "--variations", "2", "-o", "st", "--json", "--model", str(tiny_stereo_dir))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    tracks = json.loads(result.stdout)["tracks"]
    assert [t["model_family"] for t in tracks] == ["stereo", "stereo"]
    assert all(t["windows"] == 3 for t in tracks)
    for take in ("game_over_v1", "game_over_v2"):
        for ext in ("mp3", "ogg"):
            assert _channels_differ(workdir / f"st/{take}.{ext}") > 0.01
        record = json.loads((workdir / f"st/{take}.json").read_text())
        assert record["model_family"] == "stereo" and record["result"]["model_family"] == "stereo"
    from mutagen.oggvorbis import OggVorbis

    assert "(stereo)" in OggVorbis(workdir / "st/game_over_v1.ogg")["comment"][0]
    # the same run on the mono model gives identical sides: the difference above came from the model
    mono = run_cli("game_over", "-d", "0.6", "--seed", "3", "-o", "mono", "--json", "--model", str(tiny_model_dir))
    assert mono.exit_code == 0, mono.stderr
    assert json.loads(mono.stdout)["tracks"][0]["model_family"] == "mono"
    assert _channels_differ(workdir / "mono/game_over.ogg") < 1e-4


def test_cli_stereo_loop(workdir, run_cli, tiny_stereo_dir):
    result = run_cli("game_over", "-d", "2", "--loop", "--seed", "5", "-o", "lp", "--model", str(tiny_stereo_dir))
    assert result.exit_code == 0, result.stderr
    assert _channels_differ(workdir / "lp/game_over.ogg") > 0.01
