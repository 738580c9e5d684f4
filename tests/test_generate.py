"""Generation stage on the tiny model: windows, exact frame counts, seeds, parity with transformers."""

from __future__ import annotations

import pytest
import torch

from tydust_gen.base.errors import ModelError, SettingsError
from tydust_gen.base.settings import GenerationSettings, SamplingSettings
from tydust_gen.model import generate
from tydust_gen.model import loading as engine
from tydust_gen.model.backends import make_backend
from tydust_gen.model.conditioning import encode_text
from tydust_gen.model.stock import StockBackend
from tydust_gen.model.windows import Window, plan_windows


def test_plan_windows_covers_exactly_and_keeps_context():
    ws = plan_windows(4500, 1500, 900)
    assert ws[0] == Window(0, 1500)
    assert ws[1:] == [Window(600, 900)] * 3 + [Window(600, 300)]
    assert sum(w.new_frames for w in ws) == 4500
    odd = plan_windows(1234, 100, 30)
    assert sum(w.new_frames for w in odd) == 1234
    assert [w.new_frames for w in odd[1:-1]] == [30] * (len(odd) - 2) and 0 < odd[-1].new_frames <= 30
    assert plan_windows(10, 1500, 900) == [Window(0, 10)]


def test_plan_windows_rejects_non_overlapping():
    with pytest.raises(SettingsError):
        plan_windows(100, 50, 50)


def test_multi_window_run_has_exact_frame_count_and_steps(tiny_loaded):
    settings = GenerationSettings(duration_s=3.3, seed=11, window_s=1.0, stride_s=0.6)
    cond = encode_text(tiny_loaded, ["dark wave"], 3.0)
    seen = []
    codes, windows, steps = generate.generate_codes(tiny_loaded, cond, settings, progress=lambda d, t: seen.append((d, t)), backend=make_backend("fast"))
    assert codes.shape == (1, 4, 165)  # 3.3 s x 50 frames/s
    assert len(windows) == 5 and [w.context_frames for w in windows] == [0, 20, 20, 20, 20]
    assert steps == sum(w.new_frames + 3 for w in windows)
    assert seen[-1] == (steps, steps)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)  # monotone progress
    assert codes.min() >= 0 and codes.max() < tiny_loaded.codebook_size  # no pad tokens leak into the codes


def test_first_window_is_not_regenerated_by_continuation(tiny_loaded):
    """The codes of a 2-window run start with exactly the codes of the 1-window run (same seed)."""
    cond = encode_text(tiny_loaded, ["dark wave"], 3.0)
    one, _, _ = generate.generate_codes(tiny_loaded, cond, GenerationSettings(duration_s=1.0, seed=5, window_s=1.0, stride_s=0.6), backend=make_backend("fast"))
    two, _, _ = generate.generate_codes(tiny_loaded, cond, GenerationSettings(duration_s=1.6, seed=5, window_s=1.0, stride_s=0.6), backend=make_backend("fast"))
    assert torch.equal(two[:, :, :50], one)
    assert two.shape[-1] == 80


def test_continuation_is_conditioned_on_the_prefix(tiny_loaded):
    """Feeding a different prefix changes what the next window generates (greedy, so no RNG involved)."""
    cond = encode_text(tiny_loaded, ["dark wave"], 3.0)
    backend = StockBackend()
    greedy = SamplingSettings(do_sample=False)
    a = torch.zeros((1, 4, 20), dtype=torch.long)
    b = torch.full((1, 4, 20), 17, dtype=torch.long)
    out_a = backend.generate_window(tiny_loaded, cond, a, 30, greedy, lambda: None)
    out_b = backend.generate_window(tiny_loaded, cond, b, 30, greedy, lambda: None)
    assert out_a.shape == out_b.shape == (1, 4, 30)
    assert not torch.equal(out_a, out_b)


def test_same_seed_same_codes_different_seed_different_codes(tiny_loaded):
    cond = encode_text(tiny_loaded, ["calm menu"], 3.0)
    s = GenerationSettings(duration_s=0.6, seed=123)
    a, _, _ = generate.generate_codes(tiny_loaded, cond, s, backend=make_backend("fast"))
    b, _, _ = generate.generate_codes(tiny_loaded, cond, s, backend=make_backend("fast"))
    c, _, _ = generate.generate_codes(tiny_loaded, cond, GenerationSettings(duration_s=0.6, seed=124), backend=make_backend("fast"))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_stock_backend_matches_transformers_generate(tiny_loaded):
    """Our window loop around decoder.generate gives the same codes and audio as the top-level generate()."""
    from transformers import StoppingCriteria

    model = tiny_loaded.model
    inputs = tiny_loaded.processor(text=["dark wave synth"], padding=True, return_tensors="pt")
    captured = {}

    class Capture(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            captured["ids"] = input_ids.clone()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    torch.manual_seed(3)
    audio_ref = model.generate(
        **inputs, do_sample=True, guidance_scale=3.0, top_k=250, max_new_tokens=103, stopping_criteria=[Capture()]
    )
    ids = captured["ids"].reshape(1, 4, -1)
    codes_ref = torch.stack([ids[0, k, 1 + k : 1 + k + 100] for k in range(4)])[None]

    track = generate.generate_track(tiny_loaded, ["dark wave synth"], GenerationSettings(duration_s=2.0, seed=3), backend=make_backend("fast"))
    assert torch.equal(track.codes, codes_ref)
    assert track.waveforms[0].samples.shape == (1, 2 * 32000)
    assert torch.allclose(track.waveforms[0].samples, audio_ref[0].float(), atol=1e-5)


def test_window_longer_than_model_allows(tiny_loaded):
    cond = encode_text(tiny_loaded, ["x"], 3.0)
    with pytest.raises(SettingsError, match="longer than this model allows"):
        generate.generate_codes(tiny_loaded, cond, GenerationSettings(duration_s=60, window_s=50, stride_s=20), backend=make_backend("fast"))


def test_batch_of_prompts_gives_one_waveform_each(tiny_loaded):
    track = generate.generate_track(tiny_loaded, ["a", "b"], GenerationSettings(duration_s=0.4, seed=1), backend=make_backend("fast"))
    assert track.codes.shape == (2, 4, 20)
    assert len(track.waveforms) == 2 and all(w.samples.shape == (1, 12800) for w in track.waveforms)


def test_model_source_checks(tmp_path, tiny_model_dir, monkeypatch):
    assert engine.resolve_source(str(tiny_model_dir)).local_dir == tiny_model_dir.resolve()
    with pytest.raises(ModelError, match="no config.json"):
        engine.resolve_source(str(tmp_path))
    with pytest.raises(ModelError, match="neither an existing directory nor a hub id"):
        engine.resolve_source("./missing-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"not in the local Hugging Face cache .*hf download facebook/musicgen-small"):
        engine.resolve_source("facebook/musicgen-small")


def test_unknown_device_and_missing_cuda():
    with pytest.raises(SettingsError, match="unknown device 'tpu'"):
        engine.resolve_device("tpu")
    if not torch.cuda.is_available():
        from tydust_gen.base.errors import DeviceError

        with pytest.raises(DeviceError, match="no CUDA GPU"):
            engine.resolve_device("cuda")
        assert engine.resolve_device("auto") == (torch.device("cpu"), True)


def test_each_take_of_a_batch_equals_a_single_run_with_its_seed(tiny_loaded):
    """Fast backend, variations: take i samples from a stream seeded with variation_seed(seed, i)."""
    from tydust_gen.base.variations import variation_seed

    settings = lambda seed: GenerationSettings(duration_s=1.6, seed=seed, window_s=1.0, stride_s=0.6)  # noqa: E731
    seeds = [variation_seed(5, i) for i in range(3)]
    batch, _, _ = generate.generate_codes(
        tiny_loaded, encode_text(tiny_loaded, ["calm"] * 3, 3.0), settings(5), take_seeds=seeds, backend=make_backend("fast"))
    single = encode_text(tiny_loaded, ["calm"], 3.0)
    for i in range(3):
        alone, _, _ = generate.generate_codes(tiny_loaded, single, settings(seeds[i]), backend=make_backend("fast"))
        assert torch.equal(alone[0], batch[i])
    assert not torch.equal(batch[0], batch[1])
