"""Tracks in sections: ``[[section]]`` tables in the prompt file (issue: music that fits a game, item 3).

What must hold: the file is parsed and refused with one line when the sections
cannot make sense; the window plan puts a boundary on every section start; each
window is conditioned on the text (and guidance) of the section it produces while
its context is the codes before it; the record, ``--json``, tags and preview say
which sections there were; ``regenerate`` makes the same take again.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import files_under
from test_runs import error_line
from hypothesis import given, settings
from hypothesis import strategies as st
from mutagen.mp3 import MP3

from tydust_gen.base.errors import PromptError, SettingsError
from tydust_gen.base.prompts import MIN_SECTION_S, Section, check_sections, load_track
from tydust_gen.model.backends import make_backend
from tydust_gen.model.windows import plan_windows

SECTIONED = '''
prompt = "calm menu music"
title = "Boss"

[[section]]
at = 1
prompt = "intense dark synth bass"
guidance_scale = 5.0

[[section]]
at = 2
prompt = "dark wave music"
'''

# 3 s of music at the tiny model's 50 frames/s in windows of 100 frames advancing by 60:
# without sections 100 + 50 frames; with starts at frames 50 and 100 three windows of 50.
SHORT_WINDOWS = ("-d", "3", "--window", "2", "--stride", "1.2")


def write_prompt(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- the prompt file ----------------------------------------------------------------------------


def test_sections_are_parsed_with_the_top_level_prompt_as_the_opening(tmp_path):
    write_prompt(tmp_path, "boss", SECTIONED)
    spec = load_track("boss", tmp_path)
    assert spec.sections == (
        Section(0.0, "calm menu music"),
        Section(1.0, "intense dark synth bass", 5.0),
        Section(2.0, "dark wave music"),
    )
    assert spec.prompt == "calm menu music"
    assert spec.described == "[0 s] calm menu music / [1 s] intense dark synth bass / [2 s] dark wave music"


def test_a_file_with_sections_needs_no_top_level_prompt(tmp_path):
    write_prompt(tmp_path, "boss", '[[section]]\nat = 0\nprompt = "intro"\n[[section]]\nat = 4.5\nprompt = "  the\\n build "\n')
    spec = load_track("boss", tmp_path)
    assert spec.sections == (Section(0.0, "intro"), Section(4.5, "the build"))
    assert spec.prompt == "intro"


def test_a_file_without_sections_is_unchanged(tmp_path):
    write_prompt(tmp_path, "plain", 'prompt = "calm menu music"\n')
    spec = load_track("plain", tmp_path)
    assert spec.sections == () and spec.described == "calm menu music"


BAD_FILES = {
    "overlap": ('[[section]]\nat = 0\nprompt = "a"\n[[section]]\nat = 0\nprompt = "b"\n', "sections must not overlap"),
    "out of order": ('[[section]]\nat = 0\nprompt = "a"\n[[section]]\nat = 9\nprompt = "b"\n[[section]]\nat = 5\nprompt = "c"\n',
                     "starts at 5 s, not after the section before it at 9 s"),
    "a section where the top-level prompt plays": ('prompt = "p"\n[[section]]\nat = 0\nprompt = "a"\n',
                                                   "not after the top-level prompt, which plays from 0 s"),
    "nothing at the start": ('[[section]]\nat = 3\nprompt = "a"\n', "nothing plays before it"),
    "empty prompt": ('[[section]]\nat = 0\nprompt = " \\n "\n', "has an empty prompt"),
    "no prompt": ('[[section]]\nat = 0\n', 'has no prompt; add prompt = "..."'),
    "no start": ('[[section]]\nprompt = "a"\n', "has no start; add at = SECONDS"),
    "negative start": ('[[section]]\nat = -1\nprompt = "a"\n', "at must be a number of seconds, 0 or more"),
    "text start": ('[[section]]\nat = "10"\nprompt = "a"\n', "at must be a number of seconds"),
    "boolean start": ('[[section]]\nat = true\nprompt = "a"\n', "at must be a number of seconds"),
    "unknown key": ('[[section]]\nat = 0\nprompt = "a"\ntempo = 3\n', "unknown key tempo; allowed: at, prompt, guidance_scale"),
    "too short": ('[[section]]\nat = 0\nprompt = "a"\n[[section]]\nat = 0.5\nprompt = "b"\n', "at least 1 s long"),
    "empty list": ('prompt = "p"\nsection = []\n', "section is empty"),
    "not tables": ('prompt = "p"\nsection = "intro"\n', "section must be [[section]] tables"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_sections_are_refused_with_one_line_before_the_model_loads(workdir, run_cli, monkeypatch, case):
    from tydust_gen.model import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    text, message = BAD_FILES[case]
    write_prompt(workdir / "prompts", "boss", text)
    result = run_cli("boss", "-o", "out")
    assert result.exit_code == 2
    line = error_line(result)
    assert message in line and "boss.toml" in line, line
    assert not (workdir / "out").exists()


def test_bad_section_guidance_names_the_section(workdir, run_cli):
    write_prompt(workdir / "prompts", "boss", '[[section]]\nat = 0\nprompt = "a"\nguidance_scale = -2\n')
    result = run_cli("boss", "-o", "out")
    assert result.exit_code == 2
    assert "section 1: guidance_scale must be 0 or more" in error_line(result)


def test_a_section_past_the_end_is_refused_with_the_duration(workdir, run_cli):
    write_prompt(workdir / "prompts", "boss", SECTIONED)
    result = run_cli("boss", "-d", "2.5", "-o", "out")  # the section at 2 s would last 0.5 s
    assert result.exit_code == 2
    assert error_line(result).endswith(
        "the section at 2 s starts past the end of the 2.5 s track (sections need 1 s before the end); "
        "use a longer --duration or an earlier at"
    )
    assert not (workdir / "out").exists()


@given(at=st.floats(0, 700, allow_nan=False), duration=st.floats(0.1, 600))
def test_check_sections_agrees_with_the_rule(at, duration):
    spec_sections = (Section(0.0, "a"), Section(at, "b")) if at > 0 else (Section(0.0, "a"),)
    from tydust_gen.base.prompts import TrackSpec

    spec = TrackSpec(name="t", prompt="a", path=Path("t.toml"), title="t", sections=spec_sections)
    fits = at == 0 or at <= duration - MIN_SECTION_S
    if fits:
        check_sections(spec, duration)
    else:
        with pytest.raises(PromptError):
            check_sections(spec, duration)


# --- the window plan ----------------------------------------------------------------------------


def test_window_boundaries_fall_on_section_starts_also_inside_the_first_window():
    # 90 s at 50 frames/s; sections at 10 s (inside the first 30 s window) and 50 s
    windows = plan_windows(4500, 1500, 900, section_starts=[500, 2500])
    starts, done = [], 0
    for w in windows:
        starts.append(done)
        done += w.new_frames
    assert done == 4500
    assert 500 in starts and 2500 in starts
    assert [w.section for w in windows] == [0] + [1] * 3 + [2] * 3
    assert windows[1].context_frames == 500 and windows[1].new_frames == 900  # context is all the music so far


@settings(max_examples=300, deadline=None)
@given(data=st.data(), total=st.integers(1, 6000), window=st.integers(2, 1600))
def test_window_plan_with_sections_covers_the_track_and_never_crosses_a_start(data, total, window):
    stride = data.draw(st.integers(1, window - 1))
    starts = sorted(data.draw(st.sets(st.integers(1, max(1, total - 1)), max_size=6))) if total > 1 else []
    windows = plan_windows(total, window, stride, section_starts=starts)
    done = 0
    for w in windows:
        section = sum(s <= done for s in starts)
        assert w.section == section
        # the new frames lie inside one section
        assert all(not done < s < done + w.new_frames for s in starts)
        assert 0 < w.new_frames and w.context_frames + w.new_frames <= window
        assert w.context_frames == min(window - stride, done)
        done += w.new_frames
    assert done == total
    boundaries = {sum(w.new_frames for w in windows[:i]) for i in range(len(windows))}
    assert set(starts) <= boundaries


def test_window_plan_without_sections_is_the_same_as_before():
    # the plan the first turn shipped (audiocraft's extend_stride), pinned
    assert [(w.context_frames, w.new_frames) for w in plan_windows(4500, 1500, 900)] == [
        (0, 1500), (600, 900), (600, 900), (600, 900), (600, 300),
    ]  # fmt: skip


@pytest.mark.parametrize("starts", [[0], [5, 5], [7, 3], [100]])
def test_window_plan_refuses_impossible_starts(starts):
    with pytest.raises(SettingsError):
        plan_windows(100, 50, 30, section_starts=starts)


# --- conditioning: which text each window saw ---------------------------------------------------


class Recording:
    """Wraps a real backend and records what each window was given."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.supports_take_generators = getattr(inner, "supports_take_generators", False)
        self.calls: list[dict] = []

    def generate_window(self, loaded, cond, prefix, new_frames, sampling, on_step, **kw):
        new = self.inner.generate_window(loaded, cond, prefix, new_frames, sampling, on_step, **kw)
        self.calls.append({"texts": cond.texts, "guidance": sampling.guidance_scale, "rows": int(cond.hidden.shape[0]),
                           "prefix": None if prefix is None else prefix.clone(), "new": new.clone()})  # fmt: skip
        return new


@pytest.mark.parametrize("backend", ["fast", "stock"])
def test_each_window_is_conditioned_on_its_section_and_continues_the_codes_before_it(tmp_path, tiny_loaded, backend):
    import torch

    from tydust_gen.export.ffmpeg import find_ffmpeg
    from tydust_gen.runs.pipeline import plan_track, render_takes

    write_prompt(tmp_path / "prompts", "boss", SECTIONED)
    plan = plan_track(
        "boss", cli_settings={"duration": "3", "window": "2", "stride": "1.2", "seed": "7", "backend": backend},
        prompts_dir=tmp_path / "prompts", out_dir=tmp_path / "out", overwrite=False,
    )  # fmt: skip
    recording = Recording(make_backend(backend))
    [result] = render_takes(tiny_loaded, plan, ffmpeg=find_ffmpeg(), backend=recording)
    assert result.ok, result.error
    calls = recording.calls
    assert [c["texts"] for c in calls] == [("calm menu music",), ("intense dark synth bass",), ("dark wave music",)]
    assert [c["guidance"] for c in calls] == [3.0, 5.0, 3.0]
    assert [c["rows"] for c in calls] == [2, 2, 2]  # guided: the unconditional half is there in every section
    # the context across each section start is the music just made, token for token
    codes = torch.cat([c["new"] for c in calls], dim=-1)
    assert codes.shape[-1] == 150
    assert calls[0]["prefix"] is None
    assert torch.equal(calls[1]["prefix"], codes[..., 10:50])
    assert torch.equal(calls[2]["prefix"], codes[..., 60:100])
    assert result.windows == 3
    assert [s["windows"] for s in result.sections] == [[0], [1], [2]]


def test_sections_change_the_music_and_the_text_matters(tmp_path, tiny_loaded):
    """The same seed with another section prompt changes only what comes after that section starts."""
    import torch

    from tydust_gen.export.ffmpeg import find_ffmpeg
    from tydust_gen.runs.pipeline import plan_track, render_takes

    def codes_for(text: str):
        write_prompt(tmp_path / "prompts", "boss", text)
        plan = plan_track("boss", cli_settings={"duration": "3", "window": "2", "stride": "1.2", "seed": "7"},
                          prompts_dir=tmp_path / "prompts", out_dir=tmp_path / "out", overwrite=True)  # fmt: skip
        recording = Recording(make_backend("fast"))
        render_takes(tiny_loaded, plan, ffmpeg=find_ffmpeg(), backend=recording, overwrite=True)
        return torch.cat([c["new"] for c in recording.calls], dim=-1)

    a = codes_for(SECTIONED)
    b = codes_for(SECTIONED.replace("dark wave music", "calm synth bass"))
    assert torch.equal(a[..., :100], b[..., :100])  # before the last section: same windows, same text
    assert not torch.equal(a[..., 100:], b[..., 100:])


# --- the whole run: record, --json, tags, preview, regenerate -----------------------------------


def test_cli_run_records_the_sections_and_regenerate_repeats_the_take(workdir, run_cli):
    write_prompt(workdir / "prompts", "boss", SECTIONED)
    result = run_cli("boss", *SHORT_WINDOWS, "--seed", "11", "-o", "out", "--json")
    assert result.exit_code == 0, result.stderr
    [track] = json.loads(result.stdout)["tracks"]
    assert [(s["at_s"], s["prompt"], s["guidance_scale"], s["windows"]) for s in track["sections"]] == [
        (0.0, "calm menu music", None, [0]), (1.0, "intense dark synth bass", 5.0, [1]), (2.0, "dark wave music", None, [2]),
    ]  # fmt: skip
    record = json.loads((workdir / "out/boss.json").read_text())
    assert record["prompt"]["sections"] == [
        {"at": 0.0, "prompt": "calm menu music", "guidance_scale": None},
        {"at": 1.0, "prompt": "intense dark synth bass", "guidance_scale": 5.0},
        {"at": 2.0, "prompt": "dark wave music", "guidance_scale": None},
    ]
    comment = MP3(workdir / "out/boss.mp3").tags.getall("COMM")[0].text[0]
    assert comment.startswith("[0 s] calm menu music / [1 s] intense dark synth bass / [2 s] dark wave music | seed=11")
    # the record alone makes the take again: the prompt file may have changed or gone since
    (workdir / "prompts/boss.toml").unlink()
    again = run_cli("regenerate", "out/boss.json", "-o", "again", "--json", model=False)
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["comparison"] == {"mp3": "identical", "ogg": "same audio"}
    assert json.loads((workdir / "again/boss.json").read_text())["prompt"]["sections"] == record["prompt"]["sections"]
    assert files_under(workdir / "out") == ["boss.json", "boss.mp3", "boss.ogg"]


def test_preview_marks_each_section_start(tmp_path):
    from matplotlib.image import imread

    from tydust_gen.audio.preview import render_preview

    rng = np.random.default_rng(0)
    audio = rng.normal(0, 0.1, (2, 44_100 * 4)).astype(np.float32)
    plain = imread(render_preview(audio, 44_100, tmp_path / "plain.png"))
    marked = imread(render_preview(audio, 44_100, tmp_path / "marked.png", sections=[(2.0, "§1"), (9.0, "§2")]))
    differs = np.flatnonzero(np.abs(plain - marked).sum(axis=(0, 2)) > 0)
    assert differs.size > 0
    # one mark (the line and its label) near the middle of the plot, none for the start past the end
    width = plain.shape[1]
    assert 0.35 * width < differs.min() and differs.max() < 0.65 * width, (differs.min(), differs.max(), width)


def test_sections_with_variations_give_each_take_its_own_seed(workdir, run_cli):
    write_prompt(workdir / "prompts", "boss", SECTIONED)
    batch = run_cli("boss", *SHORT_WINDOWS, "--seed", "5", "-n", "2", "-o", "out", "--json")
    assert batch.exit_code == 0, batch.stderr
    second = json.loads((workdir / "out/boss_v2.json").read_text())
    alone = run_cli("regenerate", "out/boss_v2.json", "-o", "alone", "--json", model=False)
    assert alone.exit_code == 0, alone.stderr
    # made alone, the take's title tag has no "(take 2)", so the MP3 bytes differ but not the audio
    assert json.loads(alone.stdout)["comparison"] == {"mp3": "same audio", "ogg": "same audio"}
    assert second["prompt"]["sections"][1]["guidance_scale"] == 5.0


def test_a_track_in_sections_keeps_its_tokens_limit_per_section(workdir, run_cli, monkeypatch):
    long_text = " ".join(["dark"] * 600)
    write_prompt(workdir / "prompts", "boss", f'prompt = "calm"\n[[section]]\nat = 1\nprompt = "{long_text}"\n')
    result = run_cli("boss", "-d", "3", "-o", "out")
    assert result.exit_code == 2
    assert "the section at 1 s of 'boss' is" in error_line(result)

