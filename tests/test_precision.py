"""Precision (--dtype), the self-check with its fallback ladder, non-finite logits, and the GPU listing.

Everything runs on the CPU: torch computes fp16 and bf16 there (slowly), so the reduced-precision
step math is checked against fp32 here; what needs a GPU lives in tests/test_gpu.py.

Tolerances, as ``max|logits − fp32 logits| / max|fp32 logits|`` on the tiny model over 24
teacher-forced positions (measured: fp16 5.5e-4, bf16 4.0e-3; bounds ~5× that).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from tydust_gen.base.errors import DeviceError, GenerationError, SettingsError
from tydust_gen.base.settings import GenerationSettings, SamplingSettings
from tydust_gen.model import cpu_kernel, fast, loading, selfcheck
from tydust_gen.model.backends import make_backend
from tydust_gen.model.conditioning import encode_text
from tydust_gen.model.fast import FastBackend
from tydust_gen.model.generate import generate_codes
from tydust_gen.model.stock import StockBackend, autocast

PROMPTS = ["dark synth bass", "calm menu music with a long tail of words"]
STEP_TOLERANCE = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _load(model_dir, dtype):
    return loading.load_model(loading.resolve_source(str(model_dir)), torch.device("cpu"), dtype=dtype)


@pytest.fixture(scope="module")
def teacher_ids():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (len(PROMPTS) * 4, 24), generator=gen)
    ids[:, 0] = 256  # the tiny model's start token
    return ids


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_each_dtype_step_matches_fp32(tiny_model_dir, tiny_loaded, teacher_ids, dtype):
    """Our step in fp16/bf16 stays within the stated tolerance of fp32, incremental and prefill alike,
    and with its fp32 residual stream it is at least as close to fp32 as transformers under autocast."""
    ref = FastBackend().teacher_forced_logits(tiny_loaded, encode_text(tiny_loaded, PROMPTS, 3.0), teacher_ids)
    low = _load(tiny_model_dir, dtype)
    cond = encode_text(low, PROMPTS, 3.0)
    for incremental in (True, False):
        ours = FastBackend().teacher_forced_logits(low, cond, teacher_ids, incremental=incremental)
        assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
        assert _rel(ours, ref) <= STEP_TOLERANCE[dtype], incremental
    with torch.inference_mode(), autocast(low):
        theirs = low.model.decoder(
            input_ids=teacher_ids.repeat(2, 1), encoder_hidden_states=cond.hidden, encoder_attention_mask=cond.mask
        ).logits.float()
    assert _rel(ours, ref) <= _rel(theirs, ref)


@pytest.mark.parametrize("name", ["fp16", "bf16"])
def test_only_the_decoder_is_reduced_precision(tiny_model_dir, name):
    dtype = loading.resolve_dtype(name, torch.device("cpu"))
    loaded = _load(tiny_model_dir, dtype)
    held = lambda m: {p.dtype for p in m.parameters()}  # noqa: E731
    assert held(loaded.model.text_encoder) == {torch.float32}
    assert held(loaded.model.audio_encoder) == {torch.float32}
    assert held(loaded.model.decoder) == {dtype} and loaded.dtype == dtype
    cond = encode_text(loaded, PROMPTS[:1], 3.0)
    assert cond.hidden.dtype == torch.float32
    # both backends decode it: the stock one under autocast (fp32 text meets fp16/bf16 weights)
    settings = GenerationSettings(duration_s=0.3, seed=3)
    for backend in (StockBackend(), FastBackend()):
        codes, _, _ = generate_codes(loaded, cond, settings, backend=backend)
        assert codes.shape == (1, 4, 15) and 0 <= int(codes.min()) and int(codes.max()) < 256


def test_resolve_dtype(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 1)
    assert loading.resolve_dtype("auto", cpu) == torch.float32
    assert loading.resolve_dtype(" FP16 ", cpu) == torch.float16  # allowed on the CPU (slow; for tests)
    with pytest.raises(SettingsError, match="unknown --dtype 'fp64'; use one of: auto, fp16, bf16, fp32"):
        loading.resolve_dtype("fp64", cpu)
    # a GPU is judged by its own compute capability: cuda:1 here is a Turing card, cuda:0 an Ampere one
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5) if torch.device(d).index == 1 else (8, 0))
    assert loading.resolve_dtype("auto", gpu) == torch.float16
    assert loading.resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    with pytest.raises(DeviceError, match="does not support bf16"):
        loading.resolve_dtype("bf16", gpu)


def test_cli_dtype_fp16_on_cpu_recorded_and_bad_dtype_refused(workdir, run_cli):
    bad = run_cli("game_over", "-d", "0.2", "-o", "out", "--dtype", "fp64")
    assert bad.exit_code == 2
    assert bad.stderr.strip() == "error: unknown --dtype 'fp64'; use one of: auto, fp16, bf16, fp32"
    assert not (workdir / "out").exists()
    ok = run_cli("game_over", "-d", "0.2", "-o", "out", "--seed", "1", "--dtype", "fp16", "--json")
    assert ok.exit_code == 0, ok.stderr
    shown = json.loads(ok.stdout)
    assert shown["dtype"] == "fp16"
    path = shown["tracks"][0]["decode_path"]
    assert path["dtype"] == "fp16" and path["path"] == "fast" and path["fell_back_from"] == []
    assert path["self_check"]["max_error"] <= selfcheck.TOLERANCE["float16"]
    record = json.loads((workdir / "out" / "game_over.json").read_text())
    assert record["dtype"] == "float16"
    assert record["precision"]["text_encoder"] == "float32" and record["precision"]["decoder_weights"] == "float16"
    assert record["result"]["decode_path"] == path


# ----------------------------------------------------------------------------- self-check and ladder


def test_self_check_passes_and_leaves_the_seeded_take_alone(tiny_loaded):
    cond = encode_text(tiny_loaded, PROMPTS, 3.0)
    settings = GenerationSettings(duration_s=0.5, seed=11)
    plain, _, _ = generate_codes(tiny_loaded, cond, settings, backend=FastBackend())
    checked = make_backend("fast", self_check=True)
    ours, _, _ = generate_codes(tiny_loaded, cond, settings, backend=checked)
    assert torch.equal(ours, plain)  # the check drew nothing from the seeded global RNG
    report = checked.report
    assert report["path"] == "fast" and report["fell_back_from"] == [] and report["dtype"] == "fp32"
    assert report["self_check"]["positions"] == selfcheck.SELF_CHECK_POSITIONS
    assert report["self_check"]["max_error"] <= 1e-4
    # once per model: a second track does not check again
    first = checked.active_for(tiny_loaded)
    assert checked.active_for(tiny_loaded) is first and checked.report is report


def _corrupt(monkeypatch, bad_paths: dict[str, str]):
    """Make FastBackend.teacher_forced_logits wrong for the ladder rungs named in ``bad_paths``."""
    real = FastBackend.teacher_forced_logits

    def rung_path(backend) -> str:
        return "fast-mkl" if not backend.native else ("fast-eager" if not backend.cuda_graph else "fast")

    def patched(self, loaded, cond, ids, **kw):
        out = real(self, loaded, cond, ids, **kw)
        how = bad_paths.get(rung_path(self))
        if how == "nan":
            out = out.clone()
            out[0, 3, 7] = float("nan")
        elif how == "offset":
            out = out + 0.5 * out.abs().max()
        return out

    monkeypatch.setattr(FastBackend, "teacher_forced_logits", patched)


def test_forced_nan_falls_back_to_the_next_rung(tiny_loaded, monkeypatch):
    _corrupt(monkeypatch, {"fast": "nan"})
    warnings: list[str] = []
    backend = selfcheck.CheckedBackend("fast", warn=warnings.append)
    monkeypatch.setattr(selfcheck, "ladder", lambda name, device: [
        selfcheck.Rung("fast", FastBackend()), selfcheck.Rung("fast-mkl", FastBackend(native=False)),
        selfcheck.Rung("stock", StockBackend(), checked=False),
    ])  # fmt: skip
    cond = encode_text(tiny_loaded, PROMPTS[:1], 3.0)
    settings = GenerationSettings(duration_s=0.4, seed=2)
    codes, _, _ = generate_codes(tiny_loaded, cond, settings, backend=backend)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0] == "self-check: fast on cpu (fp32) failed: non-finite logits; using fast-mkl"
    report = backend.report
    assert report["path"] == "fast-mkl" and report["self_check"]["max_error"] <= 1e-4
    assert [f["path"] for f in report["fell_back_from"]] == ["fast"]
    assert report["fell_back_from"][0]["reason"] == "non-finite logits"
    expect, _, _ = generate_codes(tiny_loaded, cond, settings, backend=FastBackend(native=False))
    assert torch.equal(codes, expect)


def test_every_fast_rung_wrong_falls_back_to_stock(tiny_loaded, monkeypatch):
    _corrupt(monkeypatch, {"fast": "offset", "fast-mkl": "offset"})
    monkeypatch.setattr(cpu_kernel, "status", lambda: SimpleNamespace(available=True))
    warnings: list[str] = []
    backend = make_backend("fast", self_check=True, warn=warnings.append)
    cond = encode_text(tiny_loaded, PROMPTS[:1], 3.0)
    settings = GenerationSettings(duration_s=0.4, seed=2, sampling=SamplingSettings(do_sample=True))
    codes, _, _ = generate_codes(tiny_loaded, cond, settings, backend=backend)
    assert [w.split(" failed")[0] for w in warnings] == ["self-check: fast on cpu (fp32)", "self-check: fast-mkl on cpu (fp32)"]
    assert warnings[-1].endswith("; using stock") and "differ from transformers by 0.5" in warnings[-1]
    report = backend.report
    assert report["path"] == "stock" and report["self_check"] is None
    assert [(f["path"], round(f["error"], 3)) for f in report["fell_back_from"]] == [("fast", 0.5), ("fast-mkl", 0.5)]
    expect, _, _ = generate_codes(tiny_loaded, cond, settings, backend=StockBackend())
    assert torch.equal(codes, expect)


def test_cuda_ladder_order_graph_then_eager_then_stock(tiny_loaded):
    """The CUDA ladder, walked on the CPU: the graph rung cannot capture here, so its step raises and
    the eager loop takes over, exactly as a failed capture on a GPU would."""
    rungs = selfcheck.ladder("fast", torch.device("cuda"))
    assert [(r.path, r.graph, r.checked) for r in rungs] == [
        ("fast-cuda-graph", True, True), ("fast-eager", False, True), ("stock", False, False),
    ]  # fmt: skip
    warnings: list[str] = []
    backend, report = selfcheck.choose(tiny_loaded, rungs, warnings.append, "fast")
    assert backend is rungs[1].backend and report["path"] == "fast-eager"
    assert warnings == [
        "self-check: fast-cuda-graph on cpu (fp32) failed: its step failed: CUDA graphs need a CUDA device; using fast-eager"
    ]


def test_variations_refused_when_the_ladder_ends_at_stock(tiny_loaded, monkeypatch):
    _corrupt(monkeypatch, {"fast": "nan", "fast-mkl": "nan"})
    backend = make_backend("fast", self_check=True)
    cond = encode_text(tiny_loaded, PROMPTS[:1] * 2, 3.0)
    with pytest.raises(GenerationError, match="cannot give each take its own seed"):
        generate_codes(tiny_loaded, cond, GenerationSettings(duration_s=0.3, seed=1), backend=backend, take_seeds=[1, 2])


# ----------------------------------------------------------------------------- non-finite logits in a take


def test_stock_nan_logits_stop_the_take(tiny_model_dir):
    loaded = _load(tiny_model_dir, torch.float32)
    cond = encode_text(loaded, PROMPTS[:1], 3.0)
    calls = []

    def poison(module, inputs, output):
        calls.append(1)
        return output * float("nan") if len(calls) > 3 else output

    loaded.model.decoder.lm_heads[0].register_forward_hook(poison)
    with pytest.raises(GenerationError, match="non-finite logits"):
        generate_codes(loaded, cond, GenerationSettings(duration_s=0.4, seed=1), backend=StockBackend())


@pytest.mark.parametrize("every", [1, 64], ids=["cpu-cadence", "cuda-cadence"])
def test_fast_nan_logits_stop_the_take(tiny_loaded, monkeypatch, every):
    """NaN at one step stops the window, whether the flag is read each step (CPU) or every 64 (CUDA)."""
    real = fast._logits
    seen = []

    def nan_at_step_5(prep, hidden):
        seen.append(1)
        out = real(prep, hidden)
        return out * float("nan") if len(seen) == 5 else out

    monkeypatch.setattr(fast, "_logits", nan_at_step_5)
    real_guard = fast._FiniteGuard.__init__

    def guard_init(self, device):
        real_guard(self, device)
        self.every = every

    monkeypatch.setattr(fast._FiniteGuard, "__init__", guard_init)
    cond = encode_text(tiny_loaded, PROMPTS[:1], 3.0)
    with pytest.raises(GenerationError, match="non-finite logits"):
        generate_codes(tiny_loaded, cond, GenerationSettings(duration_s=0.4, seed=1), backend=FastBackend())


def test_cli_nan_during_generation_fails_the_track_and_writes_nothing(workdir, run_cli, monkeypatch):
    real = fast._logits
    armed = [True]

    def nan_logits(prep, hidden):
        out = real(prep, hidden)
        return out * float("nan") if armed[0] else out

    real_choose = selfcheck.choose

    def clean_check(*args, **kwargs):  # the self-check sees a healthy model; generation then goes bad
        armed[0] = False
        try:
            return real_choose(*args, **kwargs)
        finally:
            armed[0] = True

    monkeypatch.setattr(fast, "_logits", nan_logits)
    monkeypatch.setattr(selfcheck, "choose", clean_check)
    result = run_cli("game_over", "-d", "0.3", "-o", "out", "--seed", "1")
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: game_over: the model produced non-finite logits (NaN or inf)")
    assert "Traceback" not in result.stderr
    assert not (workdir / "out").exists() or list((workdir / "out").iterdir()) == []


# ----------------------------------------------------------------------------- doctor's GPU listing


def _fake_cuda(monkeypatch, cards):
    """torch.cuda as a machine with ``cards`` [(name, total bytes, (major, minor))] would show it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(cards))
    index = lambda d: d if isinstance(d, int) else (torch.device(d).index or 0)  # noqa: E731  (a bare "cuda" is the current device, 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(name=cards[index(d)][0]))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=0: (cards[index(d)][1] // 2, cards[index(d)][1]))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=0: cards[index(d)][2])


def test_doctor_lists_each_gpu(monkeypatch, workdir, run_cli):
    from tydust_gen.runs import doctor

    _fake_cuda(monkeypatch, [("NVIDIA H100 80GB HBM3", 80 * 1000**3, (9, 0)), ("Tesla T4", 16 * 1000**3, (7, 5))])
    # The capture probe needs a real GPU (tests/test_gpu.py runs it); here cuda:1's capture fails.
    monkeypatch.setattr(doctor, "probe_graph_capture", lambda d: None if d.index == 0 else "operation not permitted when stream is capturing")
    result = run_cli("doctor", "--json", "--device", "cuda:1")
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    h100, t4 = checks["cuda:0"], checks["cuda:1"]
    assert h100["data"] == {
        "index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total_bytes": 80 * 1000**3, "memory_free_bytes": 40 * 1000**3,
        "compute_capability": "9.0", "bf16": True, "cuda_graphs": True, "cuda_graph_problem": None, "auto_dtype": "bf16",
    }  # fmt: skip
    assert h100["detail"] == (
        "NVIDIA H100 80GB HBM3, 40.00 GB free of 80.00 GB, compute 9.0, bf16 yes (--dtype auto: bf16), CUDA graphs capture"
    )
    assert t4["data"]["bf16"] is False and t4["data"]["auto_dtype"] == "fp16" and t4["data"]["cuda_graphs"] is False
    assert "CUDA graphs FAIL (operation not permitted when stream is capturing)" in t4["detail"]
    assert checks["device"]["ok"] and checks["device"]["detail"] == "--device cuda:1 → cuda:1"
    missing = run_cli("doctor", "--json", "--device", "cuda:2")
    device = {c["name"]: c for c in json.loads(missing.stdout)["checks"]}["device"]
    assert missing.exit_code == 3 and not device["ok"]
    assert device["detail"] == "cuda:2 does not exist: this machine has 2 CUDA device(s)"


def test_doctor_without_cuda_says_so(monkeypatch, workdir, run_cli):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run_cli("doctor", "--json")
    checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["CUDA"]["detail"] == "no CUDA GPU; tracks generate on the CPU (slow)"
    assert not any(name.startswith("cuda:") for name in checks)
    assert checks["device"]["detail"] == "--device auto → cpu (no GPU found)"
    refused = run_cli("doctor", "--json", "--device", "cuda:0")
    device = {c["name"]: c for c in json.loads(refused.stdout)["checks"]}["device"]
    assert refused.exit_code == 3 and "no CUDA GPU is available" in device["detail"]


@pytest.mark.parametrize(("dtype_flag", "expect"), [("auto", torch.bfloat16), ("fp16", torch.float16)])
def test_device_and_dtype_flow_through_generate(monkeypatch, workdir, run_cli, dtype_flag, expect):
    """--device cuda:1 and --dtype reach load_model (faked 2-GPU machine; the load itself is stopped)."""
    from tydust_gen.base.errors import ModelError

    _fake_cuda(monkeypatch, [("GPU A", 24 * 1000**3, (7, 5)), ("GPU B", 80 * 1000**3, (8, 0))])
    seen = []

    def fake_load(source, device, *, dtype=None, show_download_progress=False):
        seen.append((device, dtype))
        raise ModelError("stopped before loading (test)")

    monkeypatch.setattr(loading, "load_model", fake_load)
    result = run_cli("game_over", "-d", "0.2", "-o", "out", "--device", "cuda:1", "--dtype", dtype_flag)
    assert result.exit_code == 3 and "stopped before loading (test)" in result.stderr
    assert seen == [(torch.device("cuda", 1), expect)]  # auto: cuda:1 is judged by its own card (8.0 → bf16)
    missing = run_cli("game_over", "-d", "0.2", "-o", "out", "--device", "cuda:2")
    assert missing.exit_code == 3
    assert missing.stderr.strip() == "error: cuda:2 does not exist: this machine has 2 CUDA device(s)"
