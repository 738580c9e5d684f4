"""Prompt files and settings: parsing, precedence and every bad-input message."""

from __future__ import annotations

from pathlib import Path

import pytest

from tydust_gen.base.errors import PromptError, SettingsError
from tydust_gen.base.prompts import load_track
from tydust_gen.base.settings import MAX_DURATION_S, parse_duration, resolve_settings

REPO = Path(__file__).resolve().parent.parent


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(text, encoding="utf-8")
    return p


def test_shipped_phase4_prompt_has_the_seed_prompt_and_settings():
    spec = load_track("phase4_peak", REPO / "prompts")
    assert spec.prompt.startswith("Darkwave peak intensity music, maximum intensity driving rhythm.")
    assert spec.prompt.endswith("Peak moment of darkwave music.")
    assert "\n" not in spec.prompt
    assert spec.settings["duration"] == 90.0
    assert spec.genre == "darkwave" and spec.folder == "darkwave"
    assert spec.bpm == 124


def test_every_shipped_prompt_parses():
    names = sorted(p.stem for p in (REPO / "prompts").iterdir())
    assert len(names) >= 3
    for name in names:
        assert load_track(name, REPO / "prompts").prompt


def test_txt_prompt_is_the_whole_file(tmp_path):
    write(tmp_path, "x.txt", "  calm\n  synth pads  \n")
    spec = load_track("x", tmp_path)
    assert spec.prompt == "calm synth pads"
    assert spec.settings == {} and spec.title == "x" and spec.folder is None


def test_missing_track_lists_existing_ones(tmp_path):
    write(tmp_path, "menu.toml", 'prompt = "a"')
    write(tmp_path, "boss.txt", "b")
    with pytest.raises(PromptError) as e:
        load_track("phase9", tmp_path)
    msg = str(e.value)
    assert "phase9" in msg and "boss, menu" in msg and "\n" not in msg


def test_unknown_key_is_named(tmp_path):
    write(tmp_path, "x.toml", 'prompt = "a"\ntempo = 120\n')
    with pytest.raises(PromptError, match=r"unknown key tempo; allowed: prompt, title"):
        load_track("x", tmp_path)


def test_malformed_toml_names_the_line(tmp_path):
    write(tmp_path, "x.toml", 'prompt = "a"\nduration = = 3\n')
    with pytest.raises(PromptError, match=r"x.toml is not valid TOML: .*line 2"):
        load_track("x", tmp_path)


@pytest.mark.parametrize("text", ['prompt = "   "', "", "   \n"])
def test_empty_prompt(tmp_path, text):
    write(tmp_path, "x.toml" if "prompt" in text else "x.txt", text)
    with pytest.raises(PromptError, match="empty prompt"):
        load_track("x", tmp_path)


def test_toml_without_prompt(tmp_path):
    write(tmp_path, "x.toml", "duration = 3\n")
    with pytest.raises(PromptError, match="has no prompt"):
        load_track("x", tmp_path)


def test_both_toml_and_txt_is_ambiguous(tmp_path):
    write(tmp_path, "x.toml", 'prompt = "a"')
    write(tmp_path, "x.txt", "b")
    with pytest.raises(PromptError, match="both x.toml and x.txt"):
        load_track("x", tmp_path)


def test_bad_setting_in_file_names_the_file(tmp_path):
    write(tmp_path, "x.toml", 'prompt = "a"\nduration = -5\n')
    with pytest.raises(SettingsError, match=r"x.toml: duration must be more than 0"):
        load_track("x", tmp_path)


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/b", "", ".hidden", "x\x00y"])
def test_track_names_cannot_escape_the_prompts_folder(tmp_path, name):
    with pytest.raises(PromptError, match="not valid"):
        load_track(name, tmp_path)


def test_non_utf8_prompt(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"caf\xe9 music")
    with pytest.raises(PromptError, match="not UTF-8"):
        load_track("x", tmp_path)


@pytest.mark.parametrize(
    "value, message",
    [
        ("0", "more than 0"),
        ("-1", "more than 0"),
        ("-0", "more than 0"),
        ("abc", "is not a number"),
        ("nan", "finite"),
        ("inf", "finite"),
        ("1e9", "above the maximum"),
        (str(MAX_DURATION_S + 1), "above the maximum"),
        ("0.01", "too short"),
    ],
)
def test_bad_durations(value, message):
    with pytest.raises(SettingsError, match=message):
        parse_duration(value)


def test_precedence_cli_over_file_over_default():
    file_settings = {"duration": 45.0, "seed": 7, "temperature": 0.9}
    s = resolve_settings({"duration": "12.5", "seed": None, "top_k": "50"}, file_settings)
    assert s.duration_s == 12.5  # CLI wins
    assert s.seed == 7  # file beats default
    assert s.sampling.temperature == 0.9
    assert s.sampling.top_k == 50
    assert s.sampling.top_p == 0.0 and s.sampling.guidance_scale == 3.0  # defaults
    assert (s.window_s, s.stride_s) == (30.0, 18.0)


def test_stride_must_be_shorter_than_window():
    with pytest.raises(SettingsError, match="stride .* shorter than the window"):
        resolve_settings({"window": "10", "stride": "10"}, {})
