"""The native CPU kernel: built from source here, same products as torch, safe fallback to MKL.

The speed claim lives in bench/ (docs/BENCHMARKS.md); these tests pin what must hold
anywhere: the blocked layout, the products for 1–8 rows, the fast backend using the
kernel (and recording it), and a machine without a compiler or with a broken build
still generating the same tokens with nothing half-written in the cache.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from tydust_gen.base.settings import GenerationSettings
from tydust_gen.model import cpu_kernel
from tydust_gen.model.conditioning import encode_text
from tydust_gen.model.fast import FastBackend
from tydust_gen.model.generate import generate_codes
from tydust_gen.model.stock import StockBackend

needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler on this machine"
)


@pytest.fixture
def kernel():
    state = cpu_kernel.load()
    assert state.available, f"the CPU kernel did not build here: {state.detail}"
    return state


def test_blocked_layout():
    w = torch.arange(16 * 32, dtype=torch.float32).reshape(16, 32)
    b = cpu_kernel.block_weight(w)
    assert b.shape == (4, 2, 4, 16) and b.is_contiguous()
    for blk, chunk, j, col in [(0, 0, 0, 0), (1, 0, 3, 5), (3, 1, 3, 15), (2, 1, 2, 9)]:
        assert b[blk, chunk, j, col] == w[4 * blk + j, 16 * chunk + col]
    assert cpu_kernel.can_block(w)
    assert not cpu_kernel.can_block(torch.zeros(10, 32))  # rows not a multiple of 4
    assert not cpu_kernel.can_block(torch.zeros(16, 40))  # columns not a multiple of 16
    assert not cpu_kernel.can_block(torch.zeros(16, 32, dtype=torch.float16))


@needs_compiler
@pytest.mark.parametrize("rows", range(1, 9))
@pytest.mark.parametrize("shape", [(4, 16), (8, 16), (20, 48), (1024, 64), (64, 4096)])
def test_products_match_float64(kernel, rows, shape):
    gen = torch.Generator().manual_seed(rows * 100 + shape[0])
    w = torch.randn(*shape, generator=gen)
    x = torch.randn(rows, shape[1], generator=gen)
    got = cpu_kernel.skinny_mm(x, cpu_kernel.block_weight(w))
    exact = x.double() @ w.double().t()
    assert got.shape == (rows, shape[0]) and got.dtype == torch.float32
    # float32 accumulation over `in` terms: well inside 1e-5 of the largest product
    assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5
    # a non-contiguous x (a transposed view) is handled too
    xt = x.t().contiguous().t()
    assert torch.equal(cpu_kernel.skinny_mm(xt, cpu_kernel.block_weight(w)), got)


@needs_compiler
def test_kernel_refuses_bad_input(kernel):
    w = cpu_kernel.block_weight(torch.randn(8, 16))
    with pytest.raises(RuntimeError, match="columns"):
        cpu_kernel.skinny_mm(torch.randn(2, 32), w)
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        cpu_kernel.skinny_mm(torch.randn(9, 16), w)


@needs_compiler
def test_fast_backend_uses_kernel_and_keeps_stock_tokens(kernel, tiny_loaded):
    backend = FastBackend()
    prep = backend.prepared(tiny_loaded)
    blocked = [d.blocked is not None for layer in prep.layers for d in (layer.qkv, layer.self_out, layer.fc1, layer.fc2)]
    assert all(blocked) and prep.heads.blocked is not None
    cond = encode_text(tiny_loaded, ["dark synth bass"], 3.0)
    settings = GenerationSettings(duration_s=1.2, seed=9, window_s=0.6, stride_s=0.36)
    stock, _, _ = generate_codes(tiny_loaded, cond, settings, backend=StockBackend())
    fast, _, _ = generate_codes(tiny_loaded, cond, settings, backend=backend)
    assert torch.equal(fast, stock)


def test_no_compiler_falls_back_to_mkl_with_same_tokens(monkeypatch, tiny_loaded):
    monkeypatch.setattr(cpu_kernel, "_status", None)
    monkeypatch.setattr(cpu_kernel, "_already_registered", lambda: False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    state = cpu_kernel.load()
    assert not state.available and "no C++ compiler" in state.detail and state.label == "mkl"
    backend = FastBackend()
    prep = backend.prepared(tiny_loaded)
    assert prep.heads.blocked is None and all(layer.fc1.blocked is None for layer in prep.layers)
    cond = encode_text(tiny_loaded, ["calm menu music"], 3.0)
    settings = GenerationSettings(duration_s=0.6, seed=4)
    stock, _, _ = generate_codes(tiny_loaded, cond, settings, backend=StockBackend())
    fast, _, _ = generate_codes(tiny_loaded, cond, settings, backend=backend)
    assert torch.equal(fast, stock)


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_status", None)
    monkeypatch.setenv(cpu_kernel.DISABLE_ENV, "0")
    state = cpu_kernel.load()
    assert not state.available and cpu_kernel.DISABLE_ENV in state.detail


@needs_compiler
def test_failed_build_leaves_nothing_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernel, "FLAGS", [*cpu_kernel.FLAGS, "-DTYDUST_BROKEN", "-include", "no/such/header.h"])
    compiler = cpu_kernel._compiler()
    target = tmp_path / "cache" / "k.so"
    why = cpu_kernel._build(compiler, target)
    assert why is not None and "did not compile" in why
    assert list((tmp_path / "cache").iterdir()) == []


@needs_compiler
def test_build_writes_only_the_library(tmp_path):
    target = tmp_path / "cache" / "k.so"
    assert cpu_kernel._build(cpu_kernel._compiler(), target) is None
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["k.so"]


@needs_compiler
@pytest.mark.parametrize("prompts", [1, 4], ids=["one-take", "four-takes"])
def test_native_layer_step_matches_op_by_op(kernel, tiny_loaded, prompts):
    """One ``layers_step`` call per step gives the op-by-op step's logits (2 and 8 rows with guidance)."""
    backend = FastBackend()
    prep = backend.prepared(tiny_loaded)
    assert prep.native is not None and all(layer.native is not None for layer in prep.layers)
    cond = encode_text(tiny_loaded, ["dark synth bass", "calm menu", "boss fight", "game over"][:prompts], 3.0)
    torch.manual_seed(5)
    ids = torch.randint(0, tiny_loaded.codebook_size, (prompts * 4, 12))
    native = backend.teacher_forced_logits(tiny_loaded, cond, ids)
    saved = prep.native
    try:
        prep.native = None
        op_by_op = backend.teacher_forced_logits(tiny_loaded, cond, ids)
    finally:
        prep.native = saved
    assert native.shape == op_by_op.shape == (2 * prompts * 4, 12, tiny_loaded.codebook_size)
    assert ((native - op_by_op).abs().max() / op_by_op.abs().max()).item() < 1e-5
    assert torch.equal(native.argmax(-1), op_by_op.argmax(-1))


def test_cli_says_when_it_builds_the_kernel_and_when_it_cannot(workdir, run_cli, monkeypatch):
    monkeypatch.setattr(cpu_kernel, "pending_build", lambda: True)
    monkeypatch.setattr(cpu_kernel, "load", lambda: cpu_kernel.KernelStatus(False, "no C++ compiler (g++, c++ or clang++) on PATH"))
    result = run_cli("game_over", "-d", "0.4", "-o", "out")
    assert result.exit_code == 0, result.stderr
    assert "building the CPU decode kernel (once per machine" in result.stderr
    assert (
        "warning: CPU decode kernel not in use (no C++ compiler (g++, c++ or clang++) on PATH); "
        "decoding on MKL instead, about 1.3x slower"
    ) in result.stderr
    quiet = run_cli("game_over", "-d", "0.4", "-o", "q", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_pending_build_is_false_once_loaded(kernel):
    assert cpu_kernel.pending_build() is False
