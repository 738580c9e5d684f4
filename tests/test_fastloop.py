"""FastBackend gives transformers' tokens: teacher-forced logits, greedy, seeded sampling, windows.

Everything runs on the CPU in fp32 with tiny random models; timings live in bench/.
"""

from __future__ import annotations

import pytest
import torch

from tydust_gen.base.errors import SettingsError
from tydust_gen.base.settings import GenerationSettings, SamplingSettings
from tydust_gen.model.backends import BACKEND_NAMES, DEFAULT_BACKEND, make_backend
from tydust_gen.model.conditioning import encode_text
from tydust_gen.model.fast import FastBackend, delay_pattern
from tydust_gen.model.generate import generate_codes
from tydust_gen.model.loading import (
    LoadedModel,
    ModelSource,
    load_model,
    resolve_source,
)
from tydust_gen.model.stock import StockBackend
from tydust_gen.model.tiny import save_tiny_model

PROMPTS = ["dark synth bass", "calm menu music with a long tail of words"]  # unequal lengths: padding matters


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> LoadedModel:
    directory = save_tiny_model(tmp_path_factory.mktemp("tiny-musicgen"))
    return load_model(resolve_source(str(directory)), torch.device("cpu"))


@pytest.fixture(scope="module")
def midsize() -> LoadedModel:
    """A random MusicGen with a wider, deeper decoder than the tiny one (~7 M decoder weights)."""
    from transformers import (
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
    )

    from tydust_gen.model.tiny import build_tiny_model

    small, processor = build_tiny_model()
    decoder_cfg = MusicgenDecoderConfig(
        vocab_size=512, max_position_embeddings=2048, num_hidden_layers=6, ffn_dim=1024,
        num_attention_heads=8, hidden_size=256, num_codebooks=4, pad_token_id=512, bos_token_id=512,
        audio_channels=1,
    )
    audio_cfg = small.config.audio_encoder
    audio_cfg.codebook_size = 512
    config = MusicgenConfig(text_encoder=small.config.text_encoder, audio_encoder=audio_cfg, decoder=decoder_cfg)
    torch.manual_seed(1)
    model = MusicgenForConditionalGeneration(config).eval()
    # Random init leaves logits nearly flat; sharper heads make argmax decisions meaningful.
    with torch.no_grad():
        for head in model.decoder.lm_heads:
            head.weight.mul_(20.0)
    gen = model.generation_config
    gen.decoder_start_token_id = gen.pad_token_id = gen.bos_token_id = 512
    return LoadedModel(model, processor, torch.device("cpu"), torch.float32, ModelSource("mid", None, None),
                       32_000, 50, 4, 512, 2048)


def _stock_logits(loaded, cond, ids):
    copies = cond.hidden.shape[0] * loaded.num_codebooks // ids.shape[0]
    with torch.inference_mode():
        return loaded.model.decoder(
            input_ids=ids.repeat(copies, 1), encoder_hidden_states=cond.hidden, encoder_attention_mask=cond.mask
        ).logits


def _both(loaded, cond, settings):
    stock, _, steps = generate_codes(loaded, cond, settings, backend=StockBackend())
    seen = []
    fast, windows, _ = generate_codes(loaded, cond, settings, backend=FastBackend(), progress=lambda d, t: seen.append(d))
    return stock, fast, windows, steps, seen


@pytest.mark.parametrize("incremental", [True, False], ids=["step-by-step", "prefill"])
@pytest.mark.parametrize("guidance", [3.0, 1.0], ids=["cfg", "no-cfg"])
def test_teacher_forced_logits_match_transformers(tiny, incremental, guidance):
    cond = encode_text(tiny, PROMPTS, guidance)
    torch.manual_seed(0)
    ids = torch.randint(0, tiny.codebook_size, (len(PROMPTS) * 4, 20))
    ids[:, 0] = tiny.model.generation_config.decoder_start_token_id
    ref = _stock_logits(tiny, cond, ids)
    ours = FastBackend().teacher_forced_logits(tiny, cond, ids, incremental=incremental)
    assert ours.shape == ref.shape
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-4


def test_delay_pattern_matches_transformers(tiny):
    torch.manual_seed(0)
    prefix = torch.randint(0, tiny.codebook_size, (2, 4, 7))
    start = tiny.model.generation_config.decoder_start_token_id
    ids = torch.cat([torch.full((2, 4, 1), start), prefix], dim=-1).reshape(8, 8)
    _, ref = tiny.model.decoder.build_delay_pattern_mask(ids, pad_token_id=start, max_length=8 + 12 + 3)
    ours = delay_pattern(prefix, 2, 4, 12, start, "cpu")
    assert torch.equal(ours.reshape(8, -1), ref)


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingSettings(do_sample=False),
        SamplingSettings(),  # top_k 250, guidance 3
        SamplingSettings(top_p=0.9, temperature=0.7),
        SamplingSettings(top_k=20, temperature=1.3, guidance_scale=1.0),
    ],
    ids=["greedy", "top-k", "top-p", "no-cfg"],
)
def test_one_window_same_tokens_as_stock(tiny, sampling):
    cond = encode_text(tiny, PROMPTS, sampling.guidance_scale)
    settings = GenerationSettings(duration_s=0.5, seed=7, sampling=sampling)
    stock, fast, windows, steps, seen = _both(tiny, cond, settings)
    assert len(windows) == 1
    assert fast.shape == stock.shape == (2, 4, 25)
    assert torch.equal(fast, stock)
    assert seen[:steps] == list(range(1, steps + 1))  # one progress call per decoding step


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_windows_same_tokens_as_stock(tiny, do_sample):
    cond = encode_text(tiny, PROMPTS, 3.0)
    settings = GenerationSettings(
        duration_s=1.3, seed=11, window_s=0.6, stride_s=0.36, sampling=SamplingSettings(do_sample=do_sample)
    )
    stock, fast, windows, steps, seen = _both(tiny, cond, settings)
    assert len(windows) >= 3
    assert fast.shape == stock.shape == (2, 4, 65)
    assert torch.equal(fast, stock)
    assert max(seen) == steps


def test_continuation_is_conditioned_on_its_prefix(tiny):
    """A greedy continuation must be what teacher forcing over prefix + output predicts, for both backends."""
    cond = encode_text(tiny, PROMPTS[:1], 3.0)
    torch.manual_seed(3)
    prefix = torch.randint(0, tiny.codebook_size, (1, 4, 6))
    start = tiny.model.generation_config.decoder_start_token_id
    for backend in (StockBackend(), FastBackend()):
        with torch.inference_mode():
            new = backend.generate_window(tiny, cond, prefix, 8, SamplingSettings(do_sample=False), lambda: None)
        grid = delay_pattern(torch.cat([prefix, new], dim=-1), 1, 4, 0, start, "cpu")
        logits = _stock_logits(tiny, cond, grid.reshape(4, -1))
        cond_l, uncond_l = logits.split(4)
        predicted = (uncond_l + (cond_l - uncond_l) * 3.0).argmax(-1)  # [K, L]: next token after each position
        for k in range(4):
            # codebook k's new frames sit at positions 7+k .. 14+k, predicted from the position before
            assert torch.equal(grid[0, k, 7 + k : 15 + k], predicted[k, 6 + k : 14 + k]), backend.name


def test_midsize_model_logits_and_tokens_match(midsize):
    cond = encode_text(midsize, PROMPTS, 3.0)
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (8, 12))
    ref = _stock_logits(midsize, cond, ids)
    ours = FastBackend().teacher_forced_logits(midsize, cond, ids)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    settings = GenerationSettings(duration_s=0.8, seed=5, window_s=0.5, stride_s=0.3)
    stock, fast, _, _, _ = _both(midsize, cond, settings)
    assert torch.equal(fast, stock)


def test_int8_mode_stays_close_to_fp32(midsize):
    cond = encode_text(midsize, PROMPTS[:1], 3.0)
    torch.manual_seed(0)
    ids = torch.randint(0, 512, (4, 16))
    ref = FastBackend().teacher_forced_logits(midsize, cond, ids)
    q = FastBackend(int8=True).teacher_forced_logits(midsize, cond, ids)
    assert torch.isfinite(q).all()
    assert (q.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9
    kl = (ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - q.log_softmax(-1))).sum(-1).mean().item()
    assert kl < 0.05
    settings = GenerationSettings(duration_s=0.3, seed=5)
    codes, _, _ = generate_codes(midsize, cond, settings, backend=FastBackend(int8=True))
    assert codes.shape == (1, 4, 15) and int(codes.min()) >= 0 and int(codes.max()) < 512


def test_make_backend_names():
    assert DEFAULT_BACKEND == "fast"
    built = {name: make_backend(name) for name in BACKEND_NAMES}
    assert isinstance(built["stock"], StockBackend)
    assert isinstance(built["fast"], FastBackend) and not built["fast"].int8
    assert built["fast-int8"].int8 and built["fast-int8"].name == "fast-int8"
    assert all(b.name == n for n, b in built.items())
    with pytest.raises(SettingsError, match="unknown backend"):
        make_backend("turbo")


def test_static_step_math_matches_on_cpu(tiny):
    """The CUDA-graph step (whole cache read under a mask, device-side position) is the same math.

    The graph capture itself needs a GPU (bench/gpu_check.sh); its step function runs eagerly here.
    """
    from tydust_gen.model.fast import _decoder, _logits, _open_window

    cond = encode_text(tiny, PROMPTS, 3.0)
    torch.manual_seed(2)
    ids = torch.randint(0, tiny.codebook_size, (8, 10))
    ref = _stock_logits(tiny, cond, ids)
    backend = FastBackend()
    prep = backend.prepared(tiny)
    tokens = ids.reshape(2, 4, 10).repeat(2, 1, 1)
    with torch.inference_mode():
        win = _open_window(prep, cond, 10)
        steps = [
            _logits(prep, _decoder(prep, win, tokens[:, :, t : t + 1], None, torch.tensor([t]))[:, -1])
            for t in range(10)
        ]
    ours = torch.stack(steps, dim=1)
    assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-4


def test_prepared_weights_never_outlive_their_model(tmp_path, monkeypatch):
    """A new model that gets the id() of a freed one must not run on the freed model's prepared weights.

    CPython reuses a freed object's address, so an ``id()``-keyed cache can hand model A's
    weights to model B. The reuse is made certain here by giving every object the same id.
    """
    import gc
    import weakref

    from tydust_gen.model import fast

    a_dir = save_tiny_model(tmp_path / "a", seed=0)
    b_dir = save_tiny_model(tmp_path / "b", seed=1)
    backend = FastBackend()
    a = load_model(resolve_source(str(a_dir)), torch.device("cpu"))
    monkeypatch.setattr(fast, "id", lambda obj: 1, raising=False)  # every model "reuses" A's id
    backend.prepared(a)
    a_alive = weakref.ref(a.model)
    del a
    gc.collect()
    assert a_alive() is None  # the backend does not keep the model object alive
    b = load_model(resolve_source(str(b_dir)), torch.device("cpu"))
    cond = encode_text(b, PROMPTS, 3.0)
    settings = GenerationSettings(duration_s=0.4, seed=3)
    stock, _, _ = generate_codes(b, cond, settings, backend=StockBackend())
    ours, _, _ = generate_codes(b, cond, settings, backend=backend)
    assert torch.equal(ours, stock)
    # and the same backend keeps its preparation while B lives
    assert backend.prepared(b) is backend.prepared(b)


def test_each_window_holds_its_cache_in_one_block_and_frees_it(tiny, monkeypatch):
    """A window's keys and values are views of one allocation, and nothing keeps them once the window ends.

    One block per window is what lets the system take the memory back between windows (a block of
    hundreds of MB is its own mapping; 48 blocks of ~13 MB stayed in glibc's heap and a 90 s track
    peaked 0.6 GiB higher, docs/BENCHMARKS.md). The weak references prove no window outlives its call.
    """
    import weakref

    from tydust_gen.model import fast

    opened = []
    real_open = fast._open_window

    def watching(prep, cond, length):
        win = real_open(prep, cond, length)
        caches = [*win.self_k, *win.self_v]
        base = caches[0].untyped_storage().data_ptr()
        opened.append(
            (
                {c.untyped_storage().data_ptr() for c in caches},
                base,
                [c.data_ptr() for c in caches],
                all(c.is_contiguous() for c in caches),
                [weakref.ref(c) for c in caches],
                caches[0].numel() * caches[0].element_size(),
            )
        )
        return win

    monkeypatch.setattr(fast, "_open_window", watching)
    settings = GenerationSettings(duration_s=1.3, window_s=0.6, stride_s=0.36, seed=3)
    cond = encode_text(tiny, PROMPTS[:1], settings.sampling.guidance_scale)
    generate_codes(tiny, cond, settings, backend=FastBackend())
    assert len(opened) >= 3  # several windows
    for storages, base, pointers, contiguous, refs, nbytes in opened:
        assert len(storages) == 1 and contiguous
        # every layer's keys and values side by side in the one block, none overlapping
        assert sorted(pointers) == [base + i * nbytes for i in range(len(pointers))]
        assert all(ref() is None for ref in refs)
