"""EnCodec decoding in windows: same samples as one call, bounded working set, out-of-memory as one line.

The tiny model's EnCodec has the layout of musicgen-small's (conv, LSTM, four
upsampling stages, hop 640) with random codebooks, so different codes decode to
different audio and a wrong join would show.

Measured with these tests' settings (float32, CPU): chunked against one call,
max abs error 1.8e-7 (about 1e-6 of the signal's peak) and SNR 143 dB or more;
without context the join is audibly wrong (errors around 0.1, SNR ~50 dB).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import files_under
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from transformers.models.encodec import modeling_encodec as me

from tydust_gen.base.errors import GenerationError
from tydust_gen.model.generate import DECODE_CHUNK_FRAMES, DECODE_CONTEXT_FRAMES, decode_codes, decode_take, staged_decoder

MAX_ABS_ERR = 1e-5  # full scale 1.0; measured 1.8e-7
MIN_SNR_DB = 120.0  # measured >= 143 dB


def one_call(encodec, codes):
    """The reference: transformers' own decode of the whole take in one call (the code before chunking)."""
    with torch.inference_mode():
        return encodec.decode(codes[None], audio_scales=[None]).audio_values


def snr_db(ref, got) -> float:
    noise = ((got.double() - ref.double()) ** 2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10((ref.double() ** 2).sum().item() / noise)


def random_codes(frames: int, seed: int, takes: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (takes, 4, frames), generator=g)


def test_layout_is_recognised(tiny_loaded):
    """The chunked path must really run: an unrecognised layout falls back to one call, which would pass the
    equality tests below trivially."""
    staged = staged_decoder(tiny_loaded.model.audio_encoder)
    assert staged is not None
    assert staged.hop == tiny_loaded.sample_rate // tiny_loaded.frame_rate == 640


def test_group_norm_layout_falls_back_to_one_call():
    """GroupNorm over time (EnCodec's "time_group_norm") is not local: windows would not be exact."""
    config = me.EncodecConfig(
        audio_channels=1, hidden_size=16, num_filters=4, num_residual_layers=1, upsampling_ratios=[8, 5, 4, 4],
        codebook_size=256, codebook_dim=16, num_lstm_layers=1, norm_type="time_group_norm", target_bandwidths=[2.2],
    )  # fmt: skip
    torch.manual_seed(0)
    encodec = me.EncodecModel(config).eval()
    with torch.no_grad():
        for layer in encodec.quantizer.layers:
            layer.codebook.embed.normal_()
    assert staged_decoder(encodec) is None
    codes = random_codes(120, seed=1)
    with torch.inference_mode():
        got = decode_take(encodec, codes, chunk_frames=16)
    assert torch.equal(got, one_call(encodec, codes))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.integers(1, 240),
    chunk=st.integers(3, 120),  # at most 80 windows: each costs ~10 ms of layer overhead on the tiny model
    context=st.integers(2, 12),
    seed=st.integers(0, 2**16),
)
@example(frames=7, chunk=1, context=2, seed=0)  # one frame a window, context wider than the window
@example(frames=1, chunk=500, context=10, seed=1)  # shorter than the context
@example(frames=100, chunk=50, context=2, seed=2)  # the last window ends exactly at the track's end
def test_chunked_matches_one_call(tiny_loaded, frames, chunk, context, seed):
    encodec = tiny_loaded.model.audio_encoder
    codes = random_codes(frames, seed)
    ref = one_call(encodec, codes)
    with torch.inference_mode():
        got = decode_take(encodec, codes, chunk_frames=chunk, context_frames=context)
    assert got.shape == ref.shape == (1, 1, frames * 640)
    assert (got - ref).abs().max().item() <= MAX_ABS_ERR
    assert snr_db(ref, got) >= MIN_SNR_DB


@pytest.fixture(scope="module")
def full_size_encodec():
    """musicgen-small's EnCodec (bench/musicgen_small_config.json) with random weights and codebooks."""
    import json
    from pathlib import Path

    raw = json.loads((Path(__file__).parents[1] / "bench/musicgen_small_config.json").read_text())["audio_encoder"]
    config = me.EncodecConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    torch.manual_seed(0)
    encodec = me.EncodecModel(config).eval()
    with torch.no_grad():
        for layer in encodec.quantizer.layers:
            layer.codebook.embed.normal_()
    return encodec


@pytest.mark.slow
@pytest.mark.parametrize("frames", [1, 131])
def test_full_size_layout_chunked_matches_one_call(full_size_encodec, frames):
    """The real model's layout (1024-wide 2-layer LSTM, 64 filters, hop 640, 2048-entry codebooks): windows of 50
    frames (joins at 50 and 100, a short last window of 31; or one frame alone), with the shipped context and
    with the least that worked (2), same samples as one call; without context a join shows. Measured: max abs
    error 1.2e-7 against a peak of 0.13 (SNR 140 dB and more)."""
    assert staged_decoder(full_size_encodec) is not None
    codes = torch.randint(0, 2048, (1, 4, frames), generator=torch.Generator().manual_seed(frames))
    ref = one_call(full_size_encodec, codes)
    for context in (DECODE_CONTEXT_FRAMES, 2):
        with torch.inference_mode():
            got = decode_take(full_size_encodec, codes, chunk_frames=50, context_frames=context)
        assert got.shape == ref.shape == (1, 1, frames * 640)
        assert (got - ref).abs().max().item() <= MAX_ABS_ERR
        assert snr_db(ref, got) >= MIN_SNR_DB
    if frames > 50:
        with torch.inference_mode():
            joined_blind = decode_take(full_size_encodec, codes, chunk_frames=50, context_frames=0)
        assert (joined_blind - ref).abs().max().item() > 1e-3  # the comparison can fail at a join


def test_without_context_the_join_is_wrong(tiny_loaded):
    """The comparison above can fail: windows decoded without context differ at every join."""
    encodec = tiny_loaded.model.audio_encoder
    codes = random_codes(300, seed=3)
    with torch.inference_mode():
        got = decode_take(encodec, codes, chunk_frames=50, context_frames=0)
    assert (got - one_call(encodec, codes)).abs().max().item() > 1e-3


def test_long_batch_decodes_like_one_call_per_take(tiny_loaded):
    """Default windows on a 35 s, 2-take batch: each take as its own one-call decode, exactly as long."""
    frames = 35 * tiny_loaded.frame_rate
    assert frames > DECODE_CHUNK_FRAMES + 2 * DECODE_CONTEXT_FRAMES
    codes = random_codes(frames, seed=7, takes=2)
    waves = decode_codes(tiny_loaded, codes)
    assert len(waves) == 2
    for take, wave in enumerate(waves):
        ref = one_call(tiny_loaded.model.audio_encoder, codes[take : take + 1])[0]
        assert wave.sample_rate == 32_000 and wave.samples.shape == ref.shape == (1, 35 * 32_000)
        assert wave.samples.dtype == torch.float32
        assert (wave.samples - ref).abs().max().item() <= MAX_ABS_ERR
        assert snr_db(ref, wave.samples) >= MIN_SNR_DB
    assert not torch.equal(waves[0].samples, waves[1].samples)


def test_upsampling_layers_see_one_window_at_a_time(tiny_loaded):
    """What bounds memory: the layers that run at the audio rates never get more than a window of frames."""
    encodec = tiny_loaded.model.audio_encoder
    first_upsampling_layer = encodec.decoder.layers[2]
    seen = []
    handle = first_upsampling_layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-1]))
    try:
        decode_codes(tiny_loaded, random_codes(2_000, seed=11))
    finally:
        handle.remove()
    assert seen and max(seen) <= DECODE_CHUNK_FRAMES + 2 * DECODE_CONTEXT_FRAMES
    assert sum(seen) < 2_000 * 1.1  # context is a few percent of extra work, not a second pass


ADVICE = {
    "GPU": "close other programs using the GPU or use --device cpu",
    "computer": "close other programs or use a shorter --duration",
}


OOM_ERRORS = [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "GPU"),
    (RuntimeError("out of memory"), "computer"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)"), "computer"),
    (MemoryError(), "computer"),
]


def raising(exc):
    def forward(*args, **kwargs):
        raise exc

    return forward


@pytest.mark.parametrize("exc, where", OOM_ERRORS, ids=["cuda", "plain", "cpu-allocator", "MemoryError"])
def test_out_of_memory_in_decode_is_one_line(tiny_loaded, monkeypatch, exc, where):
    monkeypatch.setattr(me.EncodecConvTranspose1d, "forward", raising(exc))
    with pytest.raises(GenerationError) as info:
        decode_codes(tiny_loaded, random_codes(60, seed=0))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"the {where} ran out of memory while decoding the audio; ")
    assert message.endswith(ADVICE[where])
    assert info.value.__cause__ is exc


def test_other_errors_in_decode_are_not_disguised(tiny_loaded, monkeypatch):
    exc = RuntimeError("Given groups=1, weight of size [8, 16, 3], expected input to have 16 channels")
    monkeypatch.setattr(me.EncodecConvTranspose1d, "forward", raising(exc))
    with pytest.raises(RuntimeError) as info:
        decode_codes(tiny_loaded, random_codes(60, seed=0))
    assert info.value is exc


# The CLI tests below use --backend stock: decoding does not depend on the backend, and stock needs no CPU
# kernel build, whose compiler temporaries would land in the private temp folder they watch.


def no_leftovers(folder):
    names = [p.name for p in folder.rglob("*")] if folder.exists() else []
    assert not [n for n in names if n.startswith(".tydust-staging-") or n.endswith(".lock")], names


@pytest.mark.parametrize("exc, where", OOM_ERRORS[:2], ids=["cuda", "plain"])
def test_cli_out_of_memory_in_decode_writes_nothing(workdir, run_cli, monkeypatch, private_tmp, exc, where):
    monkeypatch.setattr(me.EncodecConvTranspose1d, "forward", raising(exc))
    result = run_cli("game_over", "-d", "0.4", "-o", "out", "--backend", "stock")
    assert result.exit_code == 1
    line = f"error: game_over: the {where} ran out of memory while decoding the audio; {ADVICE[where]}"
    assert line in result.stderr.splitlines(), result.stderr
    assert not (workdir / "out").exists() or files_under(workdir / "out") == []
    no_leftovers(workdir)
    assert list(private_tmp.iterdir()) == []


def test_cli_out_of_memory_in_resample_writes_nothing(workdir, run_cli, monkeypatch, private_tmp):
    import torchaudio.transforms

    exc = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1073741824 bytes.")
    monkeypatch.setattr(torchaudio.transforms.Resample, "forward", raising(exc))  # the resampler, on any piece
    result = run_cli("game_over", "-d", "0.4", "-o", "out", "--backend", "stock")
    assert result.exit_code == 1
    line = f"error: game_over: the computer ran out of memory while resampling to 44.1 kHz; {ADVICE['computer']}"
    assert line in result.stderr.splitlines(), result.stderr
    assert not (workdir / "out").exists() or files_under(workdir / "out") == []
    no_leftovers(workdir)
    assert list(private_tmp.iterdir()) == []
