"""Out of memory at every stage that allocates a lot: one line with advice, nothing written; variations split.

Allocation failures are injected by replacing a real torch module's forward (or a
loader) with one that raises what torch raises: ``torch.cuda.OutOfMemoryError``
on a GPU, ``RuntimeError("... DefaultCPUAllocator: can't allocate memory ...")``
on the CPU. Decode and resample failures are covered in tests/test_decode.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import files_under

from tydust_gen.base import memory
from tydust_gen.base.errors import GenerationError
from tydust_gen.base.settings import GenerationSettings
from tydust_gen.base.variations import variation_seed
from tydust_gen.model import fast as fastloop
from tydust_gen.model import generate
from tydust_gen.model.backends import make_backend
from tydust_gen.model.conditioning import encode_text

CUDA_OOM = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
CPU_OOM = RuntimeError(
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "4294967296 bytes. Error code 12 (Cannot allocate memory)"
)


def raising(exc):
    def fail(*args, **kwargs):
        raise exc

    return fail


def no_leftovers(workdir):
    names = [p.name for p in workdir.rglob("*")]
    assert not [n for n in names if n.startswith(".tydust-staging-") or n.endswith(".lock")], names
    assert not (workdir / "out").exists() or files_under(workdir / "out") == []


def error_lines(result):
    lines = result.stderr.splitlines()
    assert not any("Traceback" in line for line in lines), result.stderr
    return [line for line in lines if line.startswith("error:")]


def test_recognises_what_torch_and_python_raise():
    assert memory.is_out_of_memory(CUDA_OOM) and memory.is_out_of_memory(CPU_OOM)
    assert memory.is_out_of_memory(MemoryError()) and memory.is_out_of_memory(RuntimeError("CUDA out of memory."))
    assert not memory.is_out_of_memory(RuntimeError("expected input to have 16 channels"))
    assert not memory.is_out_of_memory(ValueError("out of memory"))  # only the types allocators raise


@pytest.mark.parametrize(
    "exc, line",
    [
        (CUDA_OOM, "error: the GPU ran out of memory while loading the model; close other programs using the GPU or use --device cpu"),
        (CPU_OOM, "error: the computer ran out of memory while loading the model; close other programs and try again"),
        (MemoryError(), "error: the computer ran out of memory while loading the model; close other programs and try again"),
    ],
    ids=["cuda", "cpu", "MemoryError"],
)
def test_cli_out_of_memory_while_loading(workdir, run_cli, monkeypatch, exc, line):
    from transformers import MusicgenForConditionalGeneration

    monkeypatch.setattr(MusicgenForConditionalGeneration, "from_pretrained", raising(exc))
    result = run_cli("game_over", "-d", "0.4", "-o", "out")
    assert result.exit_code == 3
    assert error_lines(result) == [line]
    no_leftovers(workdir)


@pytest.mark.parametrize(
    "exc, line",
    [
        (CUDA_OOM, "error: game_over: the GPU ran out of memory while encoding the prompt; close other programs using the GPU or use --device cpu"),
        (CPU_OOM, "error: game_over: the computer ran out of memory while encoding the prompt; close other programs or use a shorter --duration"),
    ],
    ids=["cuda", "cpu"],
)
def test_cli_out_of_memory_while_conditioning(workdir, run_cli, monkeypatch, exc, line):
    from transformers.models.t5 import modeling_t5

    monkeypatch.setattr(modeling_t5.T5EncoderModel, "forward", raising(exc))
    result = run_cli("game_over", "-d", "0.4", "-o", "out", "-n", "2")
    assert result.exit_code == 1
    assert error_lines(result) == [line]
    no_leftovers(workdir)


def test_cli_out_of_memory_while_generating_one_take(workdir, run_cli, monkeypatch):
    monkeypatch.setattr(fastloop.FastBackend, "generate_window", raising(CPU_OOM))
    result = run_cli("game_over", "-d", "0.4", "-o", "out")
    assert result.exit_code == 1
    assert error_lines(result) == [
        "error: game_over: the computer ran out of memory while generating; close other programs or use a shorter --window"
    ]
    no_leftovers(workdir)


# --- variations that do not fit split into smaller batches -------------------------------------------------


def settings(seed: int) -> GenerationSettings:
    return GenerationSettings(duration_s=1.6, seed=seed, window_s=1.0, stride_s=0.6)  # two windows


def fitting(limit: int, exc=CPU_OOM, after_steps: int = 0):
    """A FastBackend.generate_window that fails for batches above ``limit`` takes once ``after_steps`` steps ran
    (0: at once; more: in a later window, after part of the batch's work), and records every batch it saw."""
    real = fastloop.FastBackend.generate_window
    seen: list[tuple[int, bool]] = []

    def generate_window(self, loaded, cond, prefix, new_frames, sampling, on_step, **kwargs):
        too_big = cond.batch_size > limit and (prefix is not None or after_steps == 0)
        seen.append((cond.batch_size, not too_big))
        if too_big:
            raise exc
        return real(self, loaded, cond, prefix, new_frames, sampling, on_step, **kwargs)

    return generate_window, seen


@pytest.mark.parametrize(
    "limit, exc, after_steps, batches",
    [
        # one entry per window call (two windows a batch): 5 takes fail, then 3, then 2; then each take alone
        (1, CPU_OOM, 0, [(5, False), (3, False), (2, False), *[(1, True)] * 10]),
        (3, CUDA_OOM, 0, [(5, False), (3, True), (3, True), (2, True), (2, True)]),
        (2, CPU_OOM, 1, [(5, True), (5, False), (3, True), (3, False), (2, True), (2, True), (2, True), (2, True),
                         (1, True), (1, True)]),
    ],
    ids=["down-to-one", "cuda-halves", "fails-in-second-window"],
)
def test_variations_that_do_not_fit_split_and_keep_their_takes(tiny_loaded, monkeypatch, limit, exc, after_steps, batches):
    seeds = [variation_seed(5, i) for i in range(5)]
    cond = encode_text(tiny_loaded, ["calm"] * 5, 3.0)
    whole, windows, steps = generate.generate_codes(tiny_loaded, cond, settings(5), take_seeds=seeds, backend=make_backend("fast"))

    generate_window, seen = fitting(limit, exc, after_steps)
    monkeypatch.setattr(fastloop.FastBackend, "generate_window", generate_window)
    reported = []
    split, split_windows, split_steps = generate.generate_codes(
        tiny_loaded, cond, settings(5), take_seeds=seeds, backend=make_backend("fast"),
        progress=lambda done, total: reported.append((done, total)),
    )  # fmt: skip
    assert seen == batches
    assert torch.equal(split, whole)
    assert (split_windows, split_steps) == (windows, steps)
    done = [d for d, _ in reported]
    assert done == sorted(done) and len(set(done)) >= steps // 2  # never goes back, and moves as the takes run
    assert reported[-1] == (steps, steps) and {t for _, t in reported} == {steps}


def test_one_take_that_does_not_fit_is_an_error(tiny_loaded, monkeypatch):
    generate_window, seen = fitting(0)
    monkeypatch.setattr(fastloop.FastBackend, "generate_window", generate_window)
    seeds = [variation_seed(5, i) for i in range(2)]
    with pytest.raises(GenerationError, match=r"^the computer ran out of memory while generating; close other"):
        generate.generate_codes(tiny_loaded, encode_text(tiny_loaded, ["calm"] * 2, 3.0), settings(5),
                                take_seeds=seeds, backend=make_backend("fast"))  # fmt: skip
    assert seen == [(2, False), (1, False)]


def test_other_errors_are_not_retried(tiny_loaded, monkeypatch):
    exc = RuntimeError("expected scalar type Float but found Half")
    calls = []

    def generate_window(self, *args, **kwargs):
        calls.append(1)
        raise exc

    monkeypatch.setattr(fastloop.FastBackend, "generate_window", generate_window)
    with pytest.raises(RuntimeError) as info:
        generate.generate_codes(tiny_loaded, encode_text(tiny_loaded, ["calm"] * 3, 3.0), settings(5),
                                take_seeds=[1, 2, 3], backend=make_backend("fast"))  # fmt: skip
    assert info.value is exc and calls == [1]


def test_cli_variations_split_when_they_do_not_fit(workdir, run_cli, monkeypatch):
    """Through the real CLI: three takes where only one fits at a time give the codes of the unsplit run."""
    decoded = []
    real_decode = generate.decode_codes

    def recording_decode(loaded, codes, **kwargs):
        decoded.append(codes.clone())
        return real_decode(loaded, codes, **kwargs)

    monkeypatch.setattr(generate, "decode_codes", recording_decode)
    args = ("game_over", "-d", "0.6", "-n", "3", "--seed", "9", "--force")
    assert run_cli(*args, "-o", "whole").exit_code == 0
    generate_window, seen = fitting(1)
    monkeypatch.setattr(fastloop.FastBackend, "generate_window", generate_window)
    result = run_cli(*args, "-o", "split")
    assert result.exit_code == 0, result.stderr
    assert seen[:2] == [(3, False), (2, False)] and {size for size, ok in seen if ok} == {1}
    assert len(decoded) == 2 and torch.equal(decoded[0], decoded[1])
    assert files_under(workdir / "split") == files_under(workdir / "whole")
