"""The memory check before loading: exact weight counts, a one-line refusal with the figures, doctor's sizes."""

from __future__ import annotations

from pathlib import Path
import json

import pytest
import torch

from tydust_gen.model import memory
from tydust_gen.model.loading import load_model, resolve_source

REPO_CONFIG = Path(__file__).resolve().parent.parent / "bench/musicgen_small_config.json"


def _small_config():
    from transformers import MusicgenConfig

    return MusicgenConfig.from_dict(json.loads(REPO_CONFIG.read_text()))


def test_weights_are_counted_exactly(tiny_model_dir, tiny_stereo_dir):
    for folder in (tiny_model_dir, tiny_stereo_dir):
        source = resolve_source(str(folder))
        need = memory.estimate_for_config(memory.config_for(source), dtype_bytes=4, rows=2, duration_s=1.0)
        model = load_model(source, torch.device("cpu")).model
        real = sum(p.numel() * p.element_size() for p in model.parameters())
        real += sum(b.numel() * b.element_size() for b in model.buffers())
        assert need.weights == real


def test_known_sizes_match_the_real_small_layout():
    config = _small_config()
    d = config.decoder
    with torch.device("meta"):
        from transformers import MusicgenForConditionalGeneration

        model = MusicgenForConditionalGeneration(config)
    assert memory.decoder_params(d.hidden_size, d.num_hidden_layers, d.ffn_dim, d.num_codebooks, d.vocab_size) == sum(
        p.numel() for p in model.decoder.parameters()
    )
    params = sum(p.numel() for p in model.parameters())
    assert memory.estimate_known_size("small", dtype_bytes=1).weights == params
    # medium and large: the published sizes, about 1.5 B and 3.3 B parameters
    assert 1.5e9 < memory.decoder_params(*memory.KNOWN_SIZES["medium"], 4, 2048) < 1.9e9
    assert 3.2e9 < memory.decoder_params(*memory.KNOWN_SIZES["large"], 4, 2048) < 3.5e9


def test_a_model_that_does_not_fit_is_refused_before_loading(workdir, run_cli, monkeypatch):
    from tydust_gen.model import loading

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the memory check")

    monkeypatch.setattr(loading, "load_model", boom)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 200 * 1000**2)
    result = run_cli("game_over", "-d", "5", "--device", "cpu")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 3, result.stderr
    assert len(lines) == 1 and "needs about 1.5 GB on cpu" in lines[0] and "but 0.2 GB is free" in lines[0], lines


def test_doctor_says_which_sizes_fit(monkeypatch):
    from tydust_gen.runs.doctor import check_model_sizes

    monkeypatch.setattr(memory, "available_bytes", lambda device: 8 * 1000**3)
    (check,) = check_model_sizes()
    if torch.cuda.is_available():
        pytest.skip("figures below are for the CPU (fp32)")
    assert "small 4.6 GB fits" in check.detail and "medium" in check.detail and "large" in check.detail
    assert "medium" in check.detail.split("does not fit")[0] and check.detail.count("does not fit") == 2


def test_the_estimate_covers_the_measured_run_and_lets_long_tracks_run():
    """Against the measurements in docs/BENCHMARKS.md (full-size musicgen-small, CPU, fp32): a 90 s run
    peaked at 3.97 GB and the windowed decode of 600 s at 3.99 GB, so the estimate must be above both; and
    since the decode runs in windows, a 600 s track must not be refused on a machine with 8 GB free
    (the estimate of a one-call decode, 57 MB per second, asked for 38 GB)."""
    small = {d: memory.estimate_known_size("small", dtype_bytes=4, duration_s=d) for d in (90, 600)}
    assert small[90].total >= 3.97e9 and small[600].total >= 3.99e9
    assert small[600].total <= 6e9
    assert small[600].decode - small[90].decode < 0.5e9  # grows slowly with the length
