"""The CUDA suite: ``pytest -m gpu`` (bench/gpu_check.sh runs it), skipped without a CUDA GPU.

None of this has run on a GPU yet (no GPU has been lent to the project; docs/SPEED.md). What it
covers, on the tiny model and on a full-size random-weight musicgen-small:

* parity per dtype: our step (eager and CUDA-graph replay) against transformers' fp32 forward;
* CUDA-graph capture and replay equal the eager step, and greedy tokens match stock in fp32;
* the self-check's ladder on a GPU, with forced failures (graph capture raising, NaN logits);
* NaN logits in a take stop it with a GenerationError and leave the CUDA context usable;
* EnCodec decode on CUDA (the chunked decode where the branch has it) against the CPU;
* the out-of-memory split of ``--variations`` (a real CUDA out-of-memory error for batches above 2).

Sized for ≤ 5 minutes on one H100-class GPU. With ``TYDUST_GPU_REPORT=path.json`` the measured
figures (errors, self-check seconds) are appended there, one JSON object per line.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from tydust_gen.base.errors import GenerationError
from tydust_gen.base.settings import GenerationSettings, SamplingSettings
from tydust_gen.model import fast, loading, selfcheck
from tydust_gen.model.conditioning import encode_text
from tydust_gen.model.fast import FastBackend
from tydust_gen.model.generate import decode_codes, generate_codes
from tydust_gen.model.stock import StockBackend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run bench/gpu_check.sh on one)"),
]

BENCH = Path(__file__).resolve().parent.parent / "bench"
PROMPTS = ["dark synth bass", "calm menu music with a long tail of words"]
POSITIONS = 48  # teacher-forced positions per parity check
#: ``max|ours − fp32 transformers| / max|…|``. CPU measurements (tests/test_precision.py, docs/SPEED.md):
#: fp16 5.5e-4 / 9.6e-4 and bf16 4.0e-3 / 8.2e-3 (tiny / full-size); GPU kernels round differently,
#: so the bounds are ~5x the CPU figures.
PARITY = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 4e-2}
DEVICE = torch.device(os.environ.get("TYDUST_GPU_DEVICE", "cuda"))


def report(**figures) -> None:
    """Append measured figures to $TYDUST_GPU_REPORT (bench/gpu_check.sh collects them)."""
    path = os.environ.get("TYDUST_GPU_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(figures) + "\n")


def dtypes() -> list[str]:
    names = ["fp32", "fp16"]
    if torch.cuda.is_available() and loading.cuda_bf16(DEVICE):
        names.append("bf16")
    return names


@pytest.fixture(scope="module")
def tiny32(tiny_model_dir):
    return loading.load_model(loading.resolve_source(str(tiny_model_dir)), DEVICE, dtype=torch.float32)


@pytest.fixture(scope="module")
def full32():
    sys.path.insert(0, str(BENCH))
    from bench import build_full_size

    return build_full_size(DEVICE, torch.float32)


def at_dtype(loaded, name: str):
    """A copy of ``loaded`` whose decoder holds ``name`` weights (T5 and EnCodec stay fp32, as load_model does)."""
    dtype = loading.resolve_dtype(name, DEVICE)
    if dtype == torch.float32:
        return loaded
    model = copy.deepcopy(loaded.model)
    model.decoder.to(dtype)
    return loading.LoadedModel(**{**loaded.__dict__, "model": model, "dtype": dtype})


def teacher_ids(loaded, batch: int):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, loaded.codebook_size, (batch * loaded.num_codebooks, POSITIONS), generator=gen)
    ids[:, 0] = int(loaded.model.generation_config.decoder_start_token_id)
    return ids.to(DEVICE)


def fp32_reference(loaded, cond, ids):
    copies = cond.hidden.shape[0] * loaded.num_codebooks // ids.shape[0]
    with torch.inference_mode():
        return loaded.model.decoder(
            input_ids=ids.repeat(copies, 1), encoder_hidden_states=cond.hidden, encoder_attention_mask=cond.mask
        ).logits.float()


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("size", ["tiny", "full"])
@pytest.mark.parametrize("name", dtypes())
def test_parity_per_dtype_eager_and_graph(request, size, name):
    base = request.getfixturevalue("tiny32" if size == "tiny" else "full32")
    prompts = PROMPTS if size == "tiny" else PROMPTS[:1]
    ids = teacher_ids(base, len(prompts))
    ref = fp32_reference(base, encode_text(base, prompts, 3.0), ids)
    loaded = at_dtype(base, name)
    cond = encode_text(loaded, prompts, 3.0)
    eager = FastBackend(cuda_graph=False).teacher_forced_logits(loaded, cond, ids)
    graph = FastBackend().teacher_forced_logits(loaded, cond, ids, graph=True)
    figures = {"eager_vs_fp32": rel(eager, ref), "graph_vs_fp32": rel(graph, ref), "graph_vs_eager": rel(graph, eager)}
    report(test="parity", size=size, dtype=name, **figures, top1=(eager.argmax(-1) == ref.argmax(-1)).float().mean().item())
    assert torch.isfinite(eager).all() and torch.isfinite(graph).all()
    assert figures["eager_vs_fp32"] <= PARITY[name] and figures["graph_vs_fp32"] <= PARITY[name], figures
    assert figures["graph_vs_eager"] <= PARITY[name] / 4, figures
    # the self-check's own measure (against transformers under autocast on the same weights) passes too
    check_cond, check_ids = selfcheck.check_inputs(loaded)
    ref_auto = selfcheck.reference_logits(loaded, check_cond, check_ids)
    rung = selfcheck.Rung("fast-cuda-graph", FastBackend(), graph=True)
    measured = selfcheck.measure(loaded, rung, check_cond, check_ids, ref_auto)
    assert measured.ok, measured


def test_graph_generation_equals_eager_and_stock_in_fp32(full32):
    """Greedy, 5 s: the graph replay gives stock's tokens in fp32, and eager gives the same."""
    cond = encode_text(full32, PROMPTS[:1], 3.0)
    settings = GenerationSettings(duration_s=5.0, seed=0, sampling=SamplingSettings(do_sample=False))
    stock, _, _ = generate_codes(full32, cond, settings, backend=StockBackend())
    graph, _, _ = generate_codes(full32, cond, settings, backend=FastBackend())
    eager, _, _ = generate_codes(full32, cond, settings, backend=FastBackend(cuda_graph=False))
    report(test="greedy_fp32", graph_vs_stock=(graph == stock).float().mean().item(), eager_vs_graph=(eager == graph).float().mean().item())
    assert torch.equal(graph, stock)
    assert torch.equal(eager, graph)


@pytest.mark.parametrize("name", dtypes())
def test_self_check_picks_the_graph_and_is_cheap(full32, name):
    loaded = at_dtype(full32, name)
    warnings: list[str] = []
    backend = selfcheck.CheckedBackend("fast", warn=warnings.append)
    started = time.perf_counter()
    backend.active_for(loaded)
    took = time.perf_counter() - started
    report(test="self_check_cost", size="full", dtype=name, seconds=took, **(backend.report["self_check"] or {}))
    assert warnings == [] and backend.report["path"] == "fast-cuda-graph", backend.report
    assert took < 5.0  # the target is well under a second once kernels are warm; first use compiles some


def test_ladder_on_cuda_with_forced_failures(tiny32, monkeypatch):
    # 1. the graph does not capture → eager
    def no_capture(self, *args, **kwargs):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(fast._StepGraph, "__init__", no_capture)
    warnings: list[str] = []
    backend = selfcheck.CheckedBackend("fast", warn=warnings.append)
    cond = encode_text(tiny32, PROMPTS[:1], 3.0)
    codes, _, _ = generate_codes(tiny32, cond, GenerationSettings(duration_s=0.4, seed=1), backend=backend)
    assert backend.report["path"] == "fast-eager" and len(warnings) == 1 and "fast-cuda-graph" in warnings[0]
    assert codes.shape == (1, 4, 20)
    monkeypatch.undo()
    # 2. NaN from every fast rung → stock, two warnings, stock's tokens
    real = FastBackend.teacher_forced_logits
    monkeypatch.setattr(FastBackend, "teacher_forced_logits", lambda self, *a, **k: real(self, *a, **k) * float("nan"))
    warnings.clear()
    backend = selfcheck.CheckedBackend("fast", warn=warnings.append)
    settings = GenerationSettings(duration_s=0.4, seed=1)
    codes, _, _ = generate_codes(tiny32, cond, settings, backend=backend)
    assert backend.report["path"] == "stock" and len(warnings) == 2
    expect, _, _ = generate_codes(tiny32, cond, settings, backend=StockBackend())
    assert torch.equal(codes, expect)


def test_nan_logits_stop_the_take_and_cuda_survives(tiny_model_dir):
    loaded = loading.load_model(loading.resolve_source(str(tiny_model_dir)), DEVICE, dtype=torch.float16)
    with torch.no_grad():
        loaded.model.decoder.lm_heads[2].weight[7] = float("nan")
    cond = encode_text(loaded, PROMPTS[:1], 3.0)
    for backend in (FastBackend(), FastBackend(cuda_graph=False), StockBackend()):
        with pytest.raises(GenerationError, match="non-finite logits"):
            generate_codes(loaded, cond, GenerationSettings(duration_s=0.4, seed=1), backend=backend)
        # sampling a NaN distribution on CUDA is a device-side assert that kills the context; we never get there
        torch.cuda.synchronize(DEVICE)
        assert torch.ones(4, device=DEVICE).sum().item() == 4.0


def test_encodec_decode_on_cuda_matches_cpu(tiny_model_dir, full32):
    """decode_codes on CUDA (chunked where the branch has it): the tiny model against the CPU, and
    a 120 s full-size decode that stays finite with the right length."""
    on_gpu = loading.load_model(loading.resolve_source(str(tiny_model_dir)), DEVICE)
    on_cpu = loading.load_model(loading.resolve_source(str(tiny_model_dir)), torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, on_gpu.codebook_size, (2, 4, 250), generator=gen)
    gpu_waves = decode_codes(on_gpu, codes.to(DEVICE))
    cpu_waves = decode_codes(on_cpu, codes)
    for g, c in zip(gpu_waves, cpu_waves):
        assert g.samples.shape == c.samples.shape
        assert (g.samples - c.samples).abs().max().item() <= 1e-3
    frames = 120 * full32.frame_rate
    long_codes = torch.randint(0, full32.codebook_size, (1, 4, frames), generator=gen).to(DEVICE)
    torch.cuda.reset_peak_memory_stats(DEVICE)
    started = time.perf_counter()
    (wave,) = decode_codes(full32, long_codes)
    report(test="decode_120s_full", seconds=time.perf_counter() - started, peak_gpu_mb=torch.cuda.max_memory_allocated(DEVICE) / 2**20)
    assert wave.samples.shape[-1] == frames * full32.sample_rate // full32.frame_rate
    assert torch.isfinite(wave.samples).all()


def test_variations_that_do_not_fit_split_into_batches(tiny32, monkeypatch):
    """A real CUDA out-of-memory error for batches above 2 takes: the 4 takes come out in batches of 2, equal to an unsplit run."""
    from tydust_gen.base.variations import variation_seed

    seeds = [variation_seed(9, i) for i in range(4)]
    cond = encode_text(tiny32, ["calm"] * 4, 3.0)
    run = GenerationSettings(duration_s=1.6, seed=9, window_s=1.0, stride_s=0.6)
    whole, _, _ = generate_codes(tiny32, cond, run, take_seeds=seeds, backend=FastBackend())
    real = FastBackend.generate_window
    seen = []

    def fitting(self, loaded, cond, prefix, new_frames, sampling, on_step, **kwargs):
        seen.append(cond.batch_size)
        if cond.batch_size > 2:
            torch.empty(1 << 50, dtype=torch.uint8, device=DEVICE)  # 1 PiB: torch.cuda.OutOfMemoryError
        return real(self, loaded, cond, prefix, new_frames, sampling, on_step, **kwargs)

    monkeypatch.setattr(FastBackend, "generate_window", fitting)
    split, _, _ = generate_codes(tiny32, cond, run, take_seeds=seeds, backend=FastBackend())
    assert seen[0] == 4 and set(seen[1:]) == {2}
    assert torch.equal(split.cpu(), whole.cpu())
