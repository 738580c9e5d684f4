"""Continuation: another track's tail, EnCodec-encoded, prompts the first window; batches order, cycles refuse.

The prompt codes are checked against EnCodec run directly on the file's samples
(read with scipy, not through our ffmpeg decode), and the continued tokens against
what teacher forcing over prompt + output predicts, on the mono and stereo tiny models.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.io import wavfile

from tydust_gen.base.settings import GenerationSettings, SamplingSettings
from tydust_gen.export.verify import sha256_file
from tydust_gen.model.conditioning import encode_text
from tydust_gen.model.fast import FastBackend, codebook_delay, delay_pattern
from tydust_gen.model.generate import generate_codes
from tydust_gen.model.stock import StockBackend
from tydust_gen.runs.pipeline import Continuation, continuation_prompt

HOP = 640  # samples per frame at 32 kHz / 50 Hz


def _wav(path, channels: int, seconds: float = 3.0, rate: int = 32_000):
    rng = np.random.default_rng(channels)
    t = np.arange(int(seconds * rate)) / rate
    left = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)
    right = 0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(t.size)
    data = np.stack([left, right][:channels], axis=1).astype(np.float32)
    wavfile.write(path, rate, data if channels > 1 else data[:, 0])
    return path


def _encodec_tail(loaded, path, frames):
    """Reference prompt codes: scipy reads the WAV, EnCodec encodes each channel, codebooks interleave L, R."""
    _, data = wavfile.read(path)
    data = data.reshape(data.shape[0], -1).T[:, -frames * HOP :]
    sides = [
        loaded.model.audio_encoder.encode(torch.from_numpy(data[c : c + 1].copy())[None]).audio_codes[0]
        for c in range(data.shape[0])
    ]
    return torch.stack(sides, dim=2).reshape(1, -1, frames)  # [1, K/2, 2, T] -> interleaved


class _Recording:
    """A backend that records the prefix each window was given."""

    def __init__(self, inner):
        self.inner, self.name, self.prefixes = inner, inner.name, []
        self.supports_take_generators = getattr(inner, "supports_take_generators", False)

    def generate_window(self, loaded, cond, prefix, *args, **kwargs):
        self.prefixes.append(None if prefix is None else prefix.clone())
        return self.inner.generate_window(loaded, cond, prefix, *args, **kwargs)


@pytest.mark.parametrize("stereo", [False, True], ids=["mono", "stereo"])
def test_first_window_prefix_is_the_encodec_codes_of_the_tail(tmp_path, tiny_loaded, tiny_stereo, stereo):
    loaded = tiny_stereo if stereo else tiny_loaded
    path = _wav(tmp_path / "before.wav", channels=2 if stereo else 1)
    codes, facts = continuation_prompt(loaded, Continuation(path=path, context_s=1.0))
    expected = _encodec_tail(loaded, path, 50)
    assert codes.shape == (1, loaded.num_codebooks, 50) and torch.equal(codes, expected)
    assert facts["prompt_frames"] == 50 and facts["sha256"] == sha256_file(path)
    backend = _Recording(FastBackend())
    cond = encode_text(loaded, ["dark synth bass"], 3.0)
    settings = GenerationSettings(duration_s=0.6, seed=1, window_s=1.5, stride_s=1.0)
    out, windows, _ = generate_codes(loaded, cond, settings, backend=backend, prompt_codes=codes)
    assert torch.equal(backend.prefixes[0], codes)  # the first window starts from the tail, token for token
    assert out.shape == (1, loaded.num_codebooks, 30)  # only the new music


@pytest.mark.parametrize("stereo", [False, True], ids=["mono", "stereo"])
def test_greedy_continuation_is_what_teacher_forcing_predicts_across_the_boundary(tiny_loaded, tiny_stereo, stereo):
    loaded = tiny_stereo if stereo else tiny_loaded
    k, channels = loaded.num_codebooks, loaded.audio_channels
    depth = k // channels
    torch.manual_seed(5)
    prompt = torch.randint(0, loaded.codebook_size, (1, k, 9))
    cond = encode_text(loaded, ["calm menu music"], 3.0)
    start = loaded.model.generation_config.decoder_start_token_id
    settings = GenerationSettings(duration_s=0.2, seed=0, window_s=1.0, stride_s=0.5, sampling=SamplingSettings(do_sample=False))
    for backend in (StockBackend(), FastBackend()):
        new, windows, _ = generate_codes(loaded, cond, settings, backend=backend, prompt_codes=prompt)
        assert len(windows) == 1 and new.shape == (1, k, 10)
        grid = delay_pattern(torch.cat([prompt, new], dim=-1), 1, k, 0, start, "cpu", channels)
        with torch.inference_mode():
            logits = loaded.model.decoder(
                input_ids=grid.reshape(k, -1).repeat(2, 1), encoder_hidden_states=cond.hidden, encoder_attention_mask=cond.mask
            ).logits
        cond_l, uncond_l = logits.split(k)
        predicted = (uncond_l + (cond_l - uncond_l) * 3.0).argmax(-1)
        for row in range(k):
            d = codebook_delay(row, channels)
            first_new = 1 + d + 9  # the position of frame 0 of the new music in row `row`
            assert torch.equal(grid[0, row, first_new : first_new + 10], predicted[row, first_new - 1 : first_new + 9]), (
                backend.name, row)  # fmt: skip
        assert grid.shape[-1] == 9 + 10 + depth


def _prompts(workdir, **files):
    folder = workdir / "chain"
    folder.mkdir()
    for name, body in files.items():
        (folder / f"{name}.toml").write_text(body)
    return ["--prompts-dir", str(folder)]


def test_batch_renders_the_continued_track_first_and_regenerate_repeats_it(workdir, run_cli):
    args = _prompts(
        workdir,
        a_boss_phase2='prompt = "intense synth"\ncontinue_from = "b_boss_phase1"\ncontext = 0.8\n',
        b_boss_phase1='prompt = "dark synth bass"\n',
    )
    result = run_cli("--all", *args, "-d", "1", "--seed", "2", "-o", "out", "--json")
    assert result.exit_code == 0, result.stderr
    tracks = {t["track"]: t for t in json.loads(result.stdout)["tracks"]}
    first = workdir / "out/b_boss_phase1.ogg"
    cont = tracks["a_boss_phase2"]["continuation"]
    assert cont["track"] == "b_boss_phase1" and cont["sha256"] == sha256_file(first) and cont["prompt_frames"] == 40
    record = json.loads((workdir / "out/a_boss_phase2.json").read_text())
    assert record["continuation"]["sha256"] == sha256_file(first) and record["continuation"]["context_s"] == 0.8
    assert tracks["b_boss_phase1"]["continuation"] is None
    again = run_cli("regenerate", "out/a_boss_phase2.json", "-o", "again", "--json", model=False)
    assert again.exit_code == 0, again.stderr
    verdicts = json.loads(again.stdout)["comparison"]
    assert verdicts["ogg"] in ("identical", "same audio") and verdicts["mp3"] in ("identical", "same audio")


def test_continue_from_file_on_the_command_line(workdir, run_cli, tmp_path):
    source = _wav(tmp_path / "theme.wav", channels=2, seconds=2.0)
    result = run_cli("game_over", "-d", "0.6", "--seed", "1", "--continue-from", str(source), "--context", "1.5",
                     "-o", "out", "--json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    track = json.loads(result.stdout)["tracks"][0]
    assert track["continuation"]["prompt_frames"] == 75 and track["continuation"]["track"] is None
    assert track["files"][0]["duration_s"] == pytest.approx(0.6, abs=0.06)  # only the new music


def test_a_cycle_of_continuations_is_refused(workdir, run_cli, no_model_load):
    args = _prompts(
        workdir,
        one='prompt = "dark synth"\ncontinue_from = "two"\n',
        two='prompt = "calm synth"\ncontinue_from = "one"\n',
    )
    result = run_cli("--all", *args, "-d", "1")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "cycle (one → two → one)" in lines[0], result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--continue-from", "nope.ogg"], "--continue-from nope.ogg: no such file"),
        (["--continue-from", "prompts/game_over.txt", "--context", "25"], "context must be more than 0 and at most 20"),
        (["--continue-from", "prompts/game_over.txt", "--context", "0"], "context must be more than 0 and at most 20"),
    ],
)
def test_bad_continuation_is_one_line_before_the_model_loads(workdir, run_cli, no_model_load, args, message):
    result = run_cli("game_over", *args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.stderr


def test_a_continued_track_outside_the_batch_must_exist(workdir, run_cli, no_model_load):
    args = _prompts(workdir, later='prompt = "dark synth"\ncontinue_from = "earlier"\n')
    result = run_cli("later", *args, "-o", "out")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "render earlier first" in lines[0], result.stderr


def test_a_continuation_is_current_only_while_what_it_continues_is_unchanged(workdir, run_cli):
    """The continued audio is an input of the take, like the prompt file: --skip-existing and ``list`` see it."""
    args = _prompts(
        workdir,
        a_boss_phase2='prompt = "intense synth"\ncontinue_from = "b_boss_phase1"\ncontext = 0.4\nduration = 0.6\nseed = 2\n',
        b_boss_phase1='prompt = "dark synth bass"\nduration = 0.6\nseed = 2\n',
    )

    def statuses(result) -> dict[str, str]:
        assert result.exit_code == 0, result.stderr
        return {t["track"]: t["status"] for t in json.loads(result.stdout)["tracks"]}

    def listed() -> dict[str, str]:
        result = run_cli("list", *args, "-o", "out", "--json", model=False)
        assert result.exit_code == 0, result.stderr
        return {t["name"]: (t["status"], t.get("detail", "")) for t in json.loads(result.stdout)["tracks"]}

    assert statuses(run_cli("--all", *args, "-o", "out", "--json")) == {"b_boss_phase1": "ok", "a_boss_phase2": "ok"}
    assert listed() == {"a_boss_phase2": ("current", ""), "b_boss_phase1": ("current", "")}
    assert statuses(run_cli("--all", *args, "-o", "out", "--skip-existing", "--json")) == {
        "b_boss_phase1": "skipped", "a_boss_phase2": "skipped",
    }  # fmt: skip
    # the continued track made again by itself (another seed): its continuation no longer follows it
    assert run_cli("b_boss_phase1", *args, "-o", "out", "--seed", "5", "--force").exit_code == 0
    assert listed()["a_boss_phase2"] == ("stale", "the continued audio changed")
    refused = run_cli("a_boss_phase2", *args, "-o", "out", "--skip-existing")
    assert refused.exit_code == 2
    assert "exists but is not current (the continued audio changed); pass --force" in refused.stderr
    # in one batch: the continued track is rendered again (its seed differs from the record), so is its continuation
    again = run_cli("--all", *args, "-o", "out", "--skip-existing", "--force", "--json")
    assert statuses(again) == {"b_boss_phase1": "ok", "a_boss_phase2": "ok"}
    record = json.loads((workdir / "out/a_boss_phase2.json").read_text())
    assert record["continuation"]["sha256"] == sha256_file(workdir / "out/b_boss_phase1.ogg")
    assert listed() == {"a_boss_phase2": ("current", ""), "b_boss_phase1": ("current", "")}


@pytest.mark.parametrize("variations", [1, 2])  # a track of several takes fails as one result under its name
def test_a_continuation_fails_when_what_it_continues_failed_in_the_same_run(workdir, run_cli, variations):
    """The continued track fails in this run while its previous take is still on disk: continuing that
    older file would join two runs' music, so the continuation fails with a line naming why, and both
    previous takes stay as they were."""
    args = _prompts(
        workdir,
        a_boss_phase2='prompt = "intense synth"\ncontinue_from = "b_boss_phase1"\ncontext = 0.4\nduration = 0.6\nseed = 2\n',
        b_boss_phase1=f'prompt = "dark synth bass"\nduration = 0.6\nseed = 2\nvariations = {variations}\n',
    )
    assert run_cli("--all", *args, "-o", "out").exit_code == 0
    before = {p.name: sha256_file(p) for p in (workdir / "out").iterdir()}
    assert ("b_boss_phase1_v1.ogg" in before) == (variations > 1)
    # fails by itself once the model is loaded: the tiny model's window is at most 40.88 s
    (workdir / "chain/b_boss_phase1.toml").write_text(
        f'prompt = "dark synth bass"\nduration = 42\nwindow = 42\nvariations = {variations}\n'
    )
    result = run_cli("--all", *args, "-o", "out", "--force", "--json")
    assert result.exit_code == 1, result.stderr
    tracks = {t["track"]: t for t in json.loads(result.stdout)["tracks"]}
    assert tracks["b_boss_phase1"]["status"] == "failed" and tracks["a_boss_phase2"]["status"] == "failed"
    assert tracks["a_boss_phase2"]["error"] == (
        "it continues b_boss_phase1, which failed in this run; fix b_boss_phase1 and render both again"
    )
    assert "error: a_boss_phase2: it continues b_boss_phase1, which failed in this run" in result.stderr
    assert {p.name: sha256_file(p) for p in (workdir / "out").iterdir()} == before
