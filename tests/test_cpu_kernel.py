"""The native CPU kernel: built from source here, same products as torch, safe fallback to MKL.

The speed claim lives in bench/ (docs/BENCHMARKS.md); these tests pin what must hold
anywhere: the products for 1–8 rows, bad input refused before native code reads it,
the fast backend using the kernel on the model's own weights (no copy) and recording
how it was built, and a machine without a compiler or with a broken build still
generating the same tokens, with nothing half-written in the cache and a failed
build remembered instead of retried.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

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


def test_which_weights_the_kernel_reads():
    assert cpu_kernel.can_read(torch.zeros(16, 32))
    assert not cpu_kernel.can_read(torch.zeros(10, 32))  # rows not a multiple of 4
    assert not cpu_kernel.can_read(torch.zeros(16, 40))  # columns not a multiple of 16
    assert not cpu_kernel.can_read(torch.zeros(16, 32, dtype=torch.float16))
    assert not cpu_kernel.can_read(torch.zeros(32, 32).t())  # a transposed view is not row-major


@needs_compiler
@pytest.mark.parametrize("rows", range(1, 9))
@pytest.mark.parametrize("shape", [(4, 16), (8, 16), (20, 48), (1024, 64), (64, 4096)])
def test_products_match_float64(kernel, rows, shape):
    gen = torch.Generator().manual_seed(rows * 100 + shape[0])
    w = torch.randn(*shape, generator=gen)
    x = torch.randn(rows, shape[1], generator=gen)
    got = cpu_kernel.skinny_mm(x, w)
    exact = x.double() @ w.double().t()
    assert got.shape == (rows, shape[0]) and got.dtype == torch.float32
    # float32 accumulation over `in` terms: well inside 1e-5 of the largest product
    assert ((got.double() - exact).abs().max() / exact.abs().max()).item() < 1e-5
    # a non-contiguous x (a transposed view) is handled too
    xt = x.t().contiguous().t()
    assert torch.equal(cpu_kernel.skinny_mm(xt, w), got)


@needs_compiler
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
def test_several_weights_come_out_side_by_side(kernel, rows):
    """q, k, v (or the K heads) in one call give what one stacked weight would, bit for bit."""
    gen = torch.Generator().manual_seed(rows)
    ws = [torch.randn(n, 48, generator=gen) for n in (4, 12, 8, 4)]
    x = torch.randn(rows, 48, generator=gen)
    together = cpu_kernel.skinny_mm(x, ws)
    assert together.shape == (rows, 28)
    assert torch.equal(together, torch.cat([cpu_kernel.skinny_mm(x, w) for w in ws], dim=1))
    assert torch.equal(together, cpu_kernel.skinny_mm(x, torch.cat(ws)))


@needs_compiler
def test_several_weights_must_agree(kernel):
    with pytest.raises(ValueError, match="weight 1: has 32 columns, expected 16"):
        cpu_kernel.skinny_mm(torch.randn(2, 16), [torch.randn(8, 16), torch.randn(8, 32)])
    with pytest.raises(ValueError, match="no weights"):
        cpu_kernel.skinny_mm(torch.randn(2, 16), [])


@needs_compiler
@pytest.mark.parametrize(
    ("x", "w", "message"),
    [
        (torch.randn(2, 32, dtype=torch.float64), torch.randn(8, 32), "x must be a float32 CPU matrix, got Double"),
        (torch.randn(2, 32), torch.randn(8, 32, dtype=torch.float64), "must be float32, got Double"),
        (torch.randn(2, 32), torch.randn(32, 8).t(), "must be contiguous"),  # a transposed view
        (torch.randn(2, 32), torch.randn(8, 64)[:, ::2], "must be contiguous"),  # every other column
        (torch.randn(2, 32), torch.randn(6, 32), "needs out % 4 == 0"),
        (torch.randn(2, 24), torch.randn(8, 24), "needs out % 4 == 0 and in % 16 == 0"),
        (torch.randn(2, 32), torch.randn(2, 8, 16), "must be a matrix"),
        (torch.randn(2, 2, 16), torch.randn(8, 32), "x must be a float32 CPU matrix"),
        (torch.randn(2, 16), torch.randn(8, 32), "x has 16 columns, the weight 32"),
        (torch.randn(9, 32), torch.randn(8, 32), "1 to 8 rows, got 9"),
        (torch.randn(0, 32), torch.randn(8, 32), "1 to 8 rows, got 0"),
    ],
    ids=["x-float64", "w-float64", "w-transposed", "w-strided", "w-rows", "w-cols", "w-3d", "x-3d", "x-cols",
         "9-rows", "0-rows"],  # fmt: skip
)
def test_kernel_refuses_bad_input(kernel, x, w, message):
    with pytest.raises(ValueError, match=message):
        cpu_kernel.skinny_mm(x, w)


def _layers_step_args(loaded, prep, rows_prompts: int = 1):
    """Valid arguments of one ``layers_step`` call at position 3, from the prepared tiny model."""
    from tydust_gen.model.fast import _open_window

    cond = encode_text(loaded, ["dark synth bass", "calm menu"][:rows_prompts], 3.0)
    win = _open_window(prep, cond, 8)
    weights, eps = prep.native
    x = torch.randn(cond.hidden.shape[0], prep.hidden)
    return [x, list(weights), list(win.native_caches), 3, prep.num_heads, prep.scale, prep.scale, list(eps)]


def _corrupt(args, what):
    """``args`` with one thing wrong (what a caller bug or a changed model layout would pass)."""
    x, weights, caches, pos, heads, s1, s2, eps = args
    weights, caches = list(weights), list(caches)
    if what == "weight-float64":
        weights[5] = weights[5].double()
    elif what == "weight-transposed":
        weights[5] = weights[5].t()  # square, so only the layout is wrong
    elif what == "weight-wrong-shape":
        weights[12] = weights[12][:-4].contiguous()  # fc1 of layer 0 four rows short
    elif what == "weight-of-other-layer-wrong":
        weights[14 + 13] = torch.zeros(weights[13].shape[0], weights[13].shape[1] + 16)  # fc2 of layer 1
    elif what == "layer-norm-short":
        weights[14 + 6] = weights[14 + 6][:-1]
    elif what == "too-few-weights":
        weights = weights[:-1]
    elif what == "cache-heads":
        caches[0] = torch.zeros(caches[0].shape[0], caches[0].shape[1] * 2, caches[0].shape[2], caches[0].shape[3] // 2)
    elif what == "cache-rows":
        caches[4 + 1] = caches[4 + 1][:1].contiguous()
    elif what == "cache-noncontiguous":
        caches[2] = caches[2].transpose(2, 3).contiguous().transpose(2, 3)
    elif what == "text-length":
        caches[3] = caches[3][:, :, :-1].contiguous()
    elif what == "bias-rows":
        caches[-1] = caches[-1][:1].contiguous()
    elif what == "x-float64":
        x = x.double()
    elif what == "x-width":
        x = torch.randn(x.shape[0], x.shape[1] + 16)
    elif what == "no-heads":
        heads = 0
    elif what == "position":
        pos = caches[0].shape[2]
    elif what == "eps":
        eps = eps[:-1]
    return [x, weights, caches, pos, heads, s1, s2, eps]


CORRUPTIONS = ["weight-float64", "weight-transposed", "weight-wrong-shape", "weight-of-other-layer-wrong",
               "layer-norm-short", "too-few-weights", "cache-heads", "cache-rows", "cache-noncontiguous",
               "text-length", "bias-rows", "x-float64", "x-width", "no-heads", "position", "eps"]  # fmt: skip


@needs_compiler
def test_layers_step_refuses_what_it_cannot_read(kernel, tiny_loaded):
    """Every argument is checked before the kernel reads memory: a ValueError, never a crash or garbage."""
    prep = FastBackend().prepared(tiny_loaded)
    assert prep.native is not None
    args = _layers_step_args(tiny_loaded, prep)
    good = torch.ops.tydust.layers_step(*args)
    assert good.shape == args[0].shape and torch.isfinite(good).all()
    for what in CORRUPTIONS:
        with pytest.raises(ValueError, match="layers_step: "):
            torch.ops.tydust.layers_step(*_corrupt(args, what))
    # the refused calls changed nothing: the good one still gives the same answer
    assert torch.equal(torch.ops.tydust.layers_step(*args), good)


@needs_compiler
def test_fast_backend_uses_kernel_and_keeps_stock_tokens(kernel, tiny_loaded):
    backend = FastBackend()
    prep = backend.prepared(tiny_loaded)
    native = [d.native for layer in prep.layers for d in (*layer.qkv.parts, layer.self_out, layer.fc1, layer.fc2)]
    assert all(native) and all(h.native for h in prep.heads.parts) and prep.native is not None
    # One copy of the weights: everything the kernel reads is the model's own storage.
    model_storage = {p.untyped_storage().data_ptr() for p in tiny_loaded.model.parameters()}
    read = [*prep.native[0], *(h.weight for h in prep.heads.parts)]
    assert {t.untyped_storage().data_ptr() for t in read} <= model_storage
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
    assert prep.native is None and not prep.heads.native and not any(layer.fc1.native for layer in prep.layers)
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
def test_failed_build_leaves_only_its_reason_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernel, "FLAGS", [*cpu_kernel.FLAGS, "-DTYDUST_BROKEN", "-include", "no/such/header.h"])
    compiler = cpu_kernel._compiler()
    target = tmp_path / "cache" / "k.so"
    why = cpu_kernel._build(compiler, target)
    assert why is not None and "did not compile" in why and "no/such/header.h" in why
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["k.so.failed"]  # no library, no temp file
    remembered = json.loads((tmp_path / "cache" / "k.so.failed").read_text())
    assert remembered["error"] == why and remembered["compiler"] == compiler
    assert remembered["compiler_version"] and "-DTYDUST_BROKEN" in remembered["flags"]
    assert "no/such/header.h" in remembered["compiler_output"]


def _fake_compiler(folder: Path, version: str, *, exit_with: str = "exit 1") -> Path:
    """A C++ compiler that answers --version and rejects every source (or dies of a signal)."""
    script = folder / "c++"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then echo "{version}"; exit 0; fi\n'
        'echo "$0" >> "$(dirname "$0")/calls"\n'
        "echo 'cpu_kernel.cpp:1: error: this source needs GCC 12 or newer' >&2\n"
        f"{exit_with}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def _fresh_process(monkeypatch):
    """As if in a new process: nothing loaded, the op not registered."""
    monkeypatch.setattr(cpu_kernel, "_status", None)
    monkeypatch.setattr(cpu_kernel, "_already_registered", lambda: False)


def _builds(folder: Path) -> int:
    calls = folder / "calls"
    return len(calls.read_text().splitlines()) if calls.exists() else 0


def test_a_failed_build_is_remembered_not_retried(monkeypatch, tmp_path):
    from tydust_gen.runs.doctor import check_cpu_kernel

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    compiler = _fake_compiler(bin_dir, "fakecc 9.1.0")
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, str(tmp_path / "kernels"))
    _fresh_process(monkeypatch)
    assert cpu_kernel.pending_build()
    first = cpu_kernel.load()
    assert not first.available and "this source needs GCC 12" in first.detail and _builds(bin_dir) == 1
    # the next run: no build, and it says why at once (the CLI's warning and doctor show this line)
    _fresh_process(monkeypatch)
    assert not cpu_kernel.pending_build()
    again = cpu_kernel.load()
    assert _builds(bin_dir) == 1 and not again.available
    assert "this source needs GCC 12" in again.detail and "remembered from an earlier build" in again.detail
    _fresh_process(monkeypatch)
    (line,) = check_cpu_kernel()
    assert "remembered from an earlier build" in line.detail and _builds(bin_dir) == 1
    # a new compiler version is tried
    _fake_compiler(bin_dir, "fakecc 12.2.0")
    _fresh_process(monkeypatch)
    assert cpu_kernel.pending_build()
    cpu_kernel.load()
    assert _builds(bin_dir) == 2
    # and so is a new source
    source = tmp_path / "cpu_kernel.cpp"
    source.write_text(cpu_kernel.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(cpu_kernel, "SOURCE", source)
    _fresh_process(monkeypatch)
    cpu_kernel.load()
    assert _builds(bin_dir) == 3


def test_a_build_killed_by_a_signal_is_not_remembered(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    compiler = _fake_compiler(bin_dir, "fakecc 12.2.0", exit_with="kill -9 $$")  # e.g. the OOM killer
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv(cpu_kernel.CACHE_ENV, str(tmp_path / "kernels"))
    _fresh_process(monkeypatch)
    assert not cpu_kernel.load().available
    assert [p for p in (tmp_path / "kernels").iterdir()] == []
    _fresh_process(monkeypatch)
    assert cpu_kernel.pending_build()
    cpu_kernel.load()
    assert _builds(bin_dir) == 2


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


@needs_compiler
def test_record_says_which_compiler_built_the_kernel(kernel, workdir, run_cli):
    result = run_cli("game_over", "-d", "0.3", "-o", "out")
    assert result.exit_code == 0, result.stderr
    record = json.loads((workdir / "out/game_over.json").read_text())
    assert record["cpu_kernel"] == "native"
    build = record["cpu_kernel_build"]
    assert build["compiler"] == cpu_kernel._compiler() and os.path.isabs(build["compiler"])
    assert build["compiler_version"] == cpu_kernel._compiler_version(build["compiler"]) != ""
    assert build["flags"][: len(cpu_kernel.FLAGS)] == cpu_kernel.FLAGS
