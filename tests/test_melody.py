"""Melody: a tune's chroma steers facebook/musicgen-melody (transformers' MusicgenMelody classes).

The tiny melody checkpoint is saved as facebook/musicgen-melody is (``model_type``
``musicgen_melody``, a ``MusicgenMelodyProcessor`` whose feature extractor has the real
chroma settings) and loaded through ``--model DIR`` and, from an HF cache layout, through
the hub id. References are transformers' own: the processor's chroma, the top-level
``MusicgenMelodyForConditionalGeneration.generate`` tokens, and a cache-free forward
over the whole sequence for windows with a prefix. The per-window melody slices are
checked against hand-computed positions of audiocraft's rule.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import MELODY_CACHE_COMMIT, REPO, files_under
from scipy.io import wavfile
from synth import music
from test_cli import check_mp3, check_ogg

from tydust_gen.base.errors import GenerationError, MelodyError
from tydust_gen.base.settings import GenerationSettings, SamplingSettings
from tydust_gen.export.verify import sha256_file
from tydust_gen.model import loading
from tydust_gen.model.conditioning import encode_text
from tydust_gen.model.fast import FastBackend
from tydust_gen.model.generate import generate_codes
from tydust_gen.model.melody import (
    MAX_MELODY_S,
    MELODY_SPAN_S,
    MelodySlice,
    chroma,
    melody_conditioning,
    window_slices,
)
from tydust_gen.model.stock import StockBackend
from tydust_gen.model.windows import plan_windows
from tydust_gen.runs.pipeline import read_melody

SR = 32_000  # Hz, the chroma extractor's rate
PROMPTS = ["dark synth bass", "calm menu music with a long tail of words"]


def _tune(seconds: float = 4.0, sr: int = SR, seed: int = 0) -> np.ndarray:
    """Mono float32: synth.music's notes with harmonics, noise bursts and a bass pad, mixed down."""
    return music(seconds, sr=sr, seed=seed, level=0.3).mean(axis=0)


def _notes(hz: list[float], seconds: float = 2.0, sr: int = SR) -> np.ndarray:
    """Mono float32: the notes of ``hz`` in turn (equal lengths), each with two harmonics."""
    t = np.arange(int(seconds * sr)) / sr
    f = np.asarray(hz)[np.minimum((t / seconds * len(hz)).astype(int), len(hz) - 1)]
    phase = 2 * np.pi * np.cumsum(f) / sr
    return (0.3 * (np.sin(phase) + 0.4 * np.sin(2 * phase) + 0.2 * np.sin(3 * phase))).astype(np.float32)


C_MAJOR = [261.63, 329.63, 392.0, 523.25]  # C E G C
F_SHARP = [369.99, 466.16, 277.18, 369.99]  # F# A# C# F#


def _wav(path, samples: np.ndarray, sr: int = SR):
    wavfile.write(path, sr, np.asarray(samples, dtype=np.float32))
    return path


# ----------------------------------------------------------------------------- checkpoint


def test_melody_checkpoint_is_saved_in_the_real_layout_and_loads(tiny_melody_dir, tiny_melody, tiny_model_dir, tiny_stereo_dir):
    config = json.loads((tiny_melody_dir / "config.json").read_text())
    assert config["model_type"] == "musicgen_melody" and config["chroma_length"] == 235 and config["num_chroma"] == 12
    processor = json.loads((tiny_melody_dir / "processor_config.json").read_text())
    assert processor["feature_extractor"]["feature_extractor_type"] == "MusicgenMelodyFeatureExtractor"
    assert type(tiny_melody.model).__name__ == "MusicgenMelodyForConditionalGeneration"
    assert type(tiny_melody.processor).__name__ == "MusicgenMelodyProcessor"
    assert tiny_melody.family == "melody" and tiny_melody.num_codebooks == 4 and tiny_melody.frame_rate == 50
    # the family is known from config.json before any weights load (the backend choice and the refusals need it)
    assert loading.peek_family(loading.resolve_source(str(tiny_melody_dir))) == "melody"
    assert loading.peek_family(loading.resolve_source(str(tiny_model_dir))) == "mono"
    assert loading.peek_family(loading.resolve_source(str(tiny_stereo_dir))) == "stereo"
    # random EnCodec codebooks, as the other tiny models: different codes decode differently
    embed = tiny_melody.model.audio_encoder.quantizer.layers[0].codebook.embed
    assert embed.abs().sum() > 0


# ----------------------------------------------------------------------------- input


@pytest.mark.parametrize("rate", [SR, 44_100], ids=["32k", "44k1"])
def test_chroma_of_a_decoded_file_matches_transformers_processor(tmp_path, tiny_melody, rate):
    """ffmpeg decode + the checkpoint's extractor give the processor's input_features for the same file.

    At 32 kHz the samples are the file's, so the chroma must be identical. At 44.1 kHz
    ffmpeg resamples where the processor uses torchaudio: the one-hot chroma may differ
    only on the rare frames where two pitch classes nearly tie.
    """
    tune = _tune(4.0, sr=rate)
    path = _wav(tmp_path / "tune.wav", tune, rate)
    ours = chroma(tiny_melody, read_melody(path, SR))
    _, raw = wavfile.read(path)
    # the processor's feature extractor on a [1, N] tensor (its torchaudio resampling takes tensors only)
    extractor = tiny_melody.processor.feature_extractor
    ref = extractor(torch.from_numpy(raw)[None], sampling_rate=rate, return_tensors="pt")["input_features"]
    assert ours.shape == ref.shape == (1, 4 * SR // 4096 + 1, 12)
    assert torch.all(ours.sum(-1) == 1)  # one-hot per frame
    same = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    if rate == SR:
        assert torch.equal(ours, ref)
    else:
        assert same >= 0.9, same
    # a different tune has a different chroma (the test signal has pitch to follow)
    other = chroma(tiny_melody, _tune(4.0, seed=7))
    assert not torch.equal(ours, other)


@pytest.mark.parametrize("guidance", [3.0, 1.0], ids=["guided", "unguided"])
@pytest.mark.parametrize("with_melody", [True, False], ids=["melody", "null-melody"])
def test_conditioning_equals_what_transformers_generate_builds(tiny_melody, guidance, with_melody):
    tune = _tune(3.0)
    inputs = tiny_melody.processor(text=PROMPTS, padding=True, return_tensors="pt")
    features = chroma(tiny_melody, tune) if with_melody else None
    kwargs = {"attention_mask": inputs["attention_mask"]}
    if with_melody:
        kwargs["input_features"] = features.expand(len(PROMPTS), -1, -1)
    gen_cfg = tiny_melody.model.generation_config
    gen_cfg_copy = type(gen_cfg).from_dict(gen_cfg.to_dict())
    gen_cfg_copy.guidance_scale = guidance
    with torch.inference_mode():
        ref = tiny_melody.model._prepare_encoder_hidden_states_kwargs_for_generation(
            inputs["input_ids"], kwargs, "input_ids", gen_cfg_copy
        )["encoder_hidden_states"]
    ours = melody_conditioning(tiny_melody, encode_text(tiny_melody, PROMPTS, guidance), features)
    assert ours.hidden.shape == ref.shape
    assert ours.hidden.shape[1] == 235 + inputs["input_ids"].shape[1]
    torch.testing.assert_close(ours.hidden, ref, rtol=0, atol=1e-6)
    # takes() splits the prepended rows as it splits text rows
    assert torch.equal(ours.takes(1, 2).hidden[0], ours.hidden[1])


def _reference_codes(loaded, prompts, tune, frames, **generate_kwargs):
    """transformers' top-level generate: it returns only audio, so the codes are read from its streamer."""

    class Tokens:
        def __init__(self):
            self.steps = []

        def put(self, value):
            self.steps.append(value if value.dim() == 2 else value[:, None])

        def end(self):
            pass

    inputs = loaded.processor(audio=[tune] * len(prompts), text=prompts, padding=True, sampling_rate=SR, return_tensors="pt")
    tokens = Tokens()
    with torch.inference_mode():
        loaded.model.generate(**inputs, max_new_tokens=frames + 3, streamer=tokens, **generate_kwargs)
    ids = torch.cat(tokens.steps, dim=1)
    start = loaded.model.generation_config.decoder_start_token_id
    _, mask = loaded.model.decoder.build_delay_pattern_mask(ids[:, :1], pad_token_id=start, max_length=ids.shape[1])
    ids = loaded.model.decoder.apply_delay_pattern_mask(ids, mask)
    return ids[ids != start].reshape(len(prompts), loaded.num_codebooks, frames)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "seeded"])
def test_stock_tokens_equal_transformers_melody_generate(tiny_melody, do_sample):
    frames = 24
    tune = _tune(3.0)
    settings = GenerationSettings(duration_s=frames / 50, seed=5, sampling=SamplingSettings(do_sample=do_sample))
    codes, windows, steps = generate_codes(
        tiny_melody, encode_text(tiny_melody, PROMPTS, 3.0), settings, backend=StockBackend(), melody=tune
    )
    assert len(windows) == 1 and steps == frames + 3
    torch.manual_seed(5)
    ref = _reference_codes(tiny_melody, PROMPTS, tune, frames, do_sample=do_sample, guidance_scale=3.0,
                           temperature=1.0, top_k=250, top_p=1.0)  # fmt: skip
    assert torch.equal(codes, ref)


def _greedy_by_full_forward(loaded, cond, prefix, new_frames, guidance):
    """Greedy decoding with no cache: every step runs the decoder over conditioning + the whole sequence."""
    model = loaded.model
    start = model.generation_config.decoder_start_token_id
    b, k = cond.batch_size, loaded.num_codebooks
    seq = torch.full((b * k, 1), start)
    p = 0 if prefix is None else prefix.shape[-1]
    if prefix is not None:
        seq = torch.cat([seq, prefix.reshape(b * k, p)], dim=1)
    steps = new_frames + loaded.delay_codebooks - 1
    _, mask = model.decoder.build_delay_pattern_mask(seq, pad_token_id=start, max_length=seq.shape[1] + steps)
    with torch.inference_mode():
        for _ in range(steps):
            ids = model.decoder.apply_delay_pattern_mask(seq, mask)
            copies = cond.hidden.shape[0] // b
            logits = model.decoder(input_ids=ids.repeat(copies, 1), encoder_hidden_states=cond.hidden, use_cache=False).logits[:, -1]
            if copies == 2:
                c, u = logits.split(b * k)
                logits = u + guidance * (c - u)
            seq = torch.cat([seq, logits.argmax(-1)[:, None]], dim=1)
    ids = model.decoder.apply_delay_pattern_mask(seq, mask)
    return ids[ids != start].reshape(b, k, -1)[:, :, p:]


def test_every_window_follows_its_melody_stretch_and_its_prefix(tiny_melody):
    """Three windows greedy: each equals a cache-free decode conditioned on its own slice of the melody."""
    tune = _tune(0.5)  # shorter than the 30 s span: every window's stretch loops
    settings = GenerationSettings(duration_s=1.3, seed=0, window_s=0.6, stride_s=0.36, sampling=SamplingSettings(do_sample=False))
    text = encode_text(tiny_melody, PROMPTS, 3.0)
    codes, windows, _ = generate_codes(tiny_melody, text, settings, backend=StockBackend(), melody=tune)
    assert len(windows) == 3 and codes.shape == (2, 4, 65)
    slices = window_slices(windows, 50, SR)
    assert [s.start for s in slices] == [0, 18 * 640, 36 * 640]
    done = 0
    for w, s in zip(windows, slices):
        cond = melody_conditioning(tiny_melody, text, chroma(tiny_melody, s.samples(tune)))
        prefix = None if w.context_frames == 0 else codes[:, :, done - w.context_frames : done]
        expected = _greedy_by_full_forward(tiny_melody, cond, prefix, w.new_frames, 3.0)
        assert torch.equal(codes[:, :, done : done + w.new_frames], expected), f"window at frame {done}"
        done += w.new_frames


def test_the_melody_changes_the_music(tiny_melody):
    """Same seed and text: another melody (or none) gives other tokens; the same melody the same ones."""
    settings = GenerationSettings(duration_s=0.4, seed=9, sampling=SamplingSettings())
    text = encode_text(tiny_melody, PROMPTS[:1], 3.0)

    def run(tune):
        return generate_codes(tiny_melody, text, settings, backend=StockBackend(), melody=tune)[0]

    a, again, b, none = run(_notes(C_MAJOR)), run(_notes(C_MAJOR)), run(_notes(F_SHARP)), run(None)
    assert not torch.equal(chroma(tiny_melody, _notes(C_MAJOR)), chroma(tiny_melody, _notes(F_SHARP)))
    assert torch.equal(a, again)
    assert not torch.equal(a, b) and not torch.equal(a, none) and not torch.equal(b, none)


def test_fast_backend_refuses_a_melody_model(tiny_melody):
    settings = GenerationSettings(duration_s=0.2, seed=0)
    with pytest.raises(GenerationError, match="use --backend stock"):
        generate_codes(tiny_melody, encode_text(tiny_melody, PROMPTS[:1], 3.0), settings, backend=FastBackend())


def test_a_melody_for_a_model_without_melody_input_is_refused(tiny_loaded):
    settings = GenerationSettings(duration_s=0.2, seed=0)
    with pytest.raises(MelodyError, match="has no melody input"):
        generate_codes(tiny_loaded, encode_text(tiny_loaded, PROMPTS[:1], 3.0), settings, backend=StockBackend(),
                       melody=_tune(1.0))  # fmt: skip


# ----------------------------------------------------------------------------- slicing (audiocraft's rule)


def test_window_slices_follow_audiocraft_rule_by_hand():
    """A 90 s track, 30 s windows, 18 s stride: windows start at 0, 18, 36, 54, 72 s (their context included),
    and each is conditioned on 30 s of melody from there, the melody looping (index mod length)."""
    windows = plan_windows(4500, 1500, 900)  # frames at 50 Hz
    slices = window_slices(windows, 50, SR)
    span = int(MELODY_SPAN_S * SR)
    assert span == 960_000
    assert [(w.context_frames, w.new_frames) for w in windows] == [(0, 1500), (600, 900), (600, 900), (600, 900), (600, 300)]
    assert slices == [MelodySlice(start, span) for start in (0, 576_000, 1_152_000, 1_728_000, 2_304_000)]
    melody = np.arange(1_280_000, dtype=np.float32)  # 40 s; each sample holds its own index
    # window 2: samples 1,152,000 .. 2,111,999 of the looped melody = the last 128,000, then 0 .. 831,999
    third = slices[2].samples(melody)
    assert third.shape == (span,)
    assert np.array_equal(third[:128_000], np.arange(1_152_000, 1_280_000))
    assert np.array_equal(third[128_000:], np.arange(0, 832_000))
    # window 0 lies inside the melody; window 1 (18 s to 48 s) wraps after 22 s
    assert np.array_equal(slices[0].samples(melody), np.arange(0, span))
    assert np.array_equal(slices[1].samples(melody), np.r_[np.arange(576_000, 1_280_000), np.arange(0, 256_000)])
    assert [s.facts(SR, melody.size)["looped"] for s in slices[:3]] == [False, True, True]
    assert slices[2].facts(SR, melody.size) == {"start_s": 36.0, "length_s": 30.0, "whole": False, "looped": True}
    # a melody shorter than the span repeats several times within one window
    short = np.arange(100_000, dtype=np.float32)
    assert np.array_equal(slices[3].samples(short), (np.arange(1_728_000, 1_728_000 + span) % 100_000).astype(np.float32))


def test_one_window_takes_the_whole_melody_and_a_continuation_starts_before_it():
    # one window (<= 30 s): audiocraft passes the whole melody; the extractor cuts it to 30 s, the model tiles it
    assert window_slices(plan_windows(1000, 1500, 900), 50, SR) == [MelodySlice(0, None)]
    melody = np.arange(10, dtype=np.float32)
    assert MelodySlice(0, None).samples(melody) is melody
    # 2,000 frames continuing 500 frames of another track: the first window's context starts 10 s before
    # the track, so its stretch starts 10 s before the melody, i.e. 10 s before its end (looped)
    windows = plan_windows(2000, 1500, 900, prompt_frames=500)
    assert [(w.context_frames, w.new_frames) for w in windows] == [(500, 1000), (600, 900), (600, 100)]
    slices = window_slices(windows, 50, SR)
    assert [s.start for s in slices] == [-320_000, 400 * 640, 1300 * 640]
    tune = np.arange(1_000_000, dtype=np.float32)
    assert np.array_equal(slices[0].samples(tune)[:320_000], np.arange(680_000, 1_000_000))
    assert slices[0].samples(tune)[320_000] == 0


def test_section_boundaries_move_the_window_starts():
    windows = plan_windows(2000, 1500, 900, section_starts=[500])
    assert [(w.context_frames, w.new_frames) for w in windows] == [(0, 500), (500, 900), (600, 600)]
    assert [s.start for s in window_slices(windows, 50, SR)] == [0, 0, 800 * 640]


# ----------------------------------------------------------------------------- the CLI


def _melody_prompts(workdir, body: str, name: str = "boss"):
    folder = workdir / "melody_prompts"
    (folder / "themes").mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.toml").write_text(body)
    return folder


def test_cli_follows_a_melody_from_the_prompt_file_and_regenerate_repeats_it(workdir, run_cli, tiny_melody_dir):
    folder = _melody_prompts(workdir, 'prompt = "dark synth bass"\nmelody = "themes/boss.wav"\n')
    theme = _wav(folder / "themes/boss.wav", _tune(2.0, sr=44_100), 44_100)  # relative to the prompt file's folder
    result = run_cli("boss", "--prompts-dir", str(folder), "-d", "1.3", "--window", "0.6", "--stride", "0.36",
                     "--seed", "3", "-o", "out", "--json", "--model", str(tiny_melody_dir))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    track = json.loads(result.stdout)["tracks"][0]
    assert track["model_family"] == "melody" and track["settings"]["backend"] == "stock"  # auto: stock for melody
    check_mp3(workdir / "out/boss.mp3", 1.3)
    check_ogg(workdir / "out/boss.ogg", 1.3)
    record = json.loads((workdir / "out/boss.json").read_text())
    assert record["model_family"] == "melody"
    followed = record["melody"]
    assert followed["path"] == str(theme.resolve()) and followed["sha256"] == sha256_file(theme)
    assert followed["duration_s"] == pytest.approx(2.0, abs=1e-3)
    assert [w["start_s"] for w in followed["windows"]] == [0.0, 0.36, 0.72]
    assert all(w["length_s"] == MELODY_SPAN_S and w["looped"] for w in followed["windows"])
    assert track["melody"] == followed
    from mutagen.oggvorbis import OggVorbis

    assert "(melody)" in OggVorbis(workdir / "out/boss.ogg")["comment"][0]

    again = run_cli("regenerate", "out/boss.json", "-o", "again", "--json", model=False)
    assert again.exit_code == 0, again.stderr
    verdicts = json.loads(again.stdout)["comparison"]
    assert verdicts["ogg"] in ("identical", "same audio") and verdicts["mp3"] in ("identical", "same audio")

    # --skip-existing: a changed melody makes the take stale
    _wav(theme, _notes(F_SHARP, sr=44_100), 44_100)
    stale = run_cli("boss", "--prompts-dir", str(folder), "-d", "1.3", "--window", "0.6", "--stride", "0.36",
                    "--seed", "3", "-o", "out", "--skip-existing", "--model", str(tiny_melody_dir))  # fmt: skip
    assert stale.exit_code == 2 and "the melody changed" in stale.stderr, stale.stderr
    # and regenerate refuses: the take would differ
    refused = run_cli("regenerate", "out/boss.json", "-o", "again2", model=False)
    lines = refused.stderr.strip().splitlines()
    assert refused.exit_code == 2 and len(lines) == 1 and "sha256 differs" in lines[0], refused.stderr
    assert not (workdir / "again2").exists() or not files_under(workdir / "again2")


def test_cli_melody_flag_changes_the_take(workdir, run_cli, tiny_melody_dir, tmp_path):
    one = _wav(tmp_path / "one.wav", _notes(C_MAJOR))
    two = _wav(tmp_path / "two.wav", _notes(F_SHARP))
    sums = {}
    for name, path in (("one", one), ("two", two)):
        result = run_cli("game_over", "-d", "0.6", "--seed", "4", "--melody", str(path), "-o", name, "--json",
                         "--model", str(tiny_melody_dir))  # fmt: skip
        assert result.exit_code == 0, result.stderr
        track = json.loads(result.stdout)["tracks"][0]
        assert track["melody"]["sha256"] == sha256_file(path)
        assert track["melody"]["windows"] == [{"start_s": 0.0, "length_s": 2.0, "whole": True}]
        sums[name] = track["files"][0]["sha256"]
    assert sums["one"] != sums["two"]


def test_hub_id_melody_model_loads_from_the_hf_cache(workdir, melody_hf_home, tmp_path):
    """`--model facebook/musicgen-melody` offline: the HF-cache snapshot loads as users' would, family melody."""
    theme = _wav(tmp_path / "theme.wav", _tune(1.5))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HOME": str(melody_hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run(
        [sys.executable, "-m", "tydust_gen", "game_over", "-d", "0.4", "-o", "out", "--model", "facebook/musicgen-melody",
         "--melody", str(theme), "-q"],
        capture_output=True, text=True, env=env, cwd=workdir,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((workdir / "out/game_over.json").read_text())
    assert record["model"]["hub_id"] == "facebook/musicgen-melody" and record["model"]["revision"] == MELODY_CACHE_COMMIT
    assert record["model_family"] == "melody" and record["melody"]["sha256"] == sha256_file(theme)
    check_ogg(workdir / "out/game_over.ogg", 0.4)


def _error_case(tmp_path, case):
    """(extra CLI arguments, model kind, expected text) of each refused melody."""
    if case == "missing":
        return ["--melody", str(tmp_path / "nope.ogg")], "melody", "nope.ogg: no such file"
    if case == "unreadable":
        bad = tmp_path / "bad.ogg"
        bad.write_bytes(b"this is not audio" * 200)
        return ["--melody", str(bad)], "melody", "ffmpeg cannot read it as audio"
    if case == "silent":
        return ["--melody", str(_wav(tmp_path / "silence.wav", np.zeros(SR, np.float32)))], "melody", "is silent"
    if case == "too-long":
        rate = 8_000  # a small file, decoded at 32 kHz all the same
        t = np.arange(int((MAX_MELODY_S + 5) * rate)) / rate
        path = _wav(tmp_path / "long.wav", 0.3 * np.sin(2 * np.pi * 440 * t), rate)
        return ["--melody", str(path)], "melody", "longer than 10 minutes"
    if case == "no-melody-model":
        return ["--melody", str(_wav(tmp_path / "tune.wav", _tune(1.0)))], "mono", "has no melody input"
    if case == "fast-backend":
        return ["--melody", str(_wav(tmp_path / "tune.wav", _tune(1.0))), "--backend", "fast"], "melody", "use --backend stock"
    if case == "variations":
        return ["--melody", str(_wav(tmp_path / "tune.wav", _tune(1.0))), "--variations", "2"], "melody", "--variations cannot be combined with a melody"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case", ["missing", "unreadable", "silent", "too-long", "no-melody-model", "fast-backend", "variations"]
)
def test_a_bad_melody_is_one_line_exit_2_before_the_model_loads(workdir, run_cli, no_model_load, tmp_path,
                                                                tiny_melody_dir, tiny_model_dir, case):  # fmt: skip
    args, kind, message = _error_case(tmp_path, case)
    model = str(tiny_melody_dir if kind == "melody" else tiny_model_dir)
    result = run_cli("game_over", "-d", "0.4", "-o", "out", *args, "--model", model)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (workdir / "out").exists() or not files_under(workdir / "out")


def test_a_bad_melody_key_in_the_prompt_file_names_the_file(workdir, run_cli, no_model_load, tiny_melody_dir):
    folder = _melody_prompts(workdir, 'prompt = "dark synth"\nmelody = "themes/missing.ogg"\n')
    result = run_cli("boss", "--prompts-dir", str(folder), "-d", "0.4", "-o", "out", "--model", str(tiny_melody_dir))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, result.stderr
    assert "boss.toml: melody = 'themes/missing.ogg': no such file" in lines[0]
    assert str(folder / "themes/missing.ogg") in lines[0]  # looked for beside the prompt file
    bad_type = _melody_prompts(workdir, 'prompt = "dark synth"\nmelody = 3\n', name="typed")
    result = run_cli("typed", "--prompts-dir", str(bad_type), "-d", "0.4", "--model", str(tiny_melody_dir))
    assert result.exit_code == 2 and "melody must name an audio file" in result.stderr


def test_memory_check_counts_a_melody_model_as_what_it_loads(tiny_melody_dir, tiny_melody):
    """The pre-load memory estimate builds the melody class (no cross-attention), not a plain MusicGen."""
    from tydust_gen.model import memory

    config = memory.config_for(loading.resolve_source(str(tiny_melody_dir)))
    floats, _ = memory.count_parameters(config)
    model = tiny_melody.model
    assert floats == sum(t.numel() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())


def test_the_tiny_melody_text_is_projected_as_the_real_ones(tiny_melody):
    """facebook/musicgen-melody's T5 (768) is narrower than its decoder (1536): the text goes through
    enc_to_dec_proj, whose config check (cross_attention_hidden_size) a melody decoder config lacks."""
    assert tiny_melody.model.text_encoder.config.hidden_size != tiny_melody.model.decoder.config.hidden_size
    cond = encode_text(tiny_melody, PROMPTS, 3.0)
    assert cond.hidden.shape[-1] == tiny_melody.model.decoder.config.hidden_size


def test_list_sees_the_melody_as_an_input_of_the_take(workdir, run_cli, tiny_melody_dir):
    folder = _melody_prompts(workdir, 'prompt = "dark synth bass"\nmelody = "themes/boss.wav"\nduration = 0.4\nseed = 3\n')
    theme = _wav(folder / "themes/boss.wav", _notes(C_MAJOR))
    assert run_cli("boss", "--prompts-dir", str(folder), "-o", "out", "--model", str(tiny_melody_dir)).exit_code == 0

    def listed() -> tuple[str, str]:
        result = run_cli("list", "--prompts-dir", str(folder), "-o", "out", "--json", model=False)
        assert result.exit_code == 0, result.stderr
        row = {t["name"]: t for t in json.loads(result.stdout)["tracks"]}["boss"]
        return row["status"], row.get("detail", "")

    assert listed() == ("current", "")
    _wav(theme, _notes(F_SHARP))
    assert listed() == ("stale", "the melody changed")
