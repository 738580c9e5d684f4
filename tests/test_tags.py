"""What users type (prompt, title, genre) and what they pass (--model) against the tags and verification.

Nothing typed may change how a file is verified, everything typed must read back
from the tags exactly (or be refused before the model loads, exit 2, one line),
and no local path may end up inside the audio files a game ships.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import tomllib
from pathlib import Path

import pytest
import torch
from conftest import files_under
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from mutagen.id3 import ID3, TCON
from mutagen.mp3 import MP3
from mutagen.oggvorbis import OggVorbis

from tydust_gen.base.errors import PromptError
from tydust_gen.base.waveform import Waveform
from tydust_gen.export import staging as export
from tydust_gen.export.ffmpeg import check_encoders, find_ffmpeg
from tydust_gen.export.tags import TrackTags
from tydust_gen.export.verify import decoded_duration, mp3_gapless_duration
from tydust_gen.model.loading import ModelSource
from tydust_gen.runs.pipeline import comment_for, model_tag_id, plan_track

# Words that are also container or tag magic numbers, and text that is hard on TOML, terminals and parsers.
MAGIC_WORDS = ["Info", "Xing", "LAME", "Lavc", "ID3", "3DI", "OggS", "vorbis", "\x03vorbis", "RIFF", "WAVE", "fLaC", "TAG"]
HOSTILE = [
    '"', "'", '"""', "'''", "\\", "\\u0000", "\\n", "=", "#", "[x]", "\t", "\x01", "\x1b[31m", "\x7f",
    "\u202e", "\u200f", "\ufeff", "\u2028", "🎮", "👾🔥", "戦闘のテーマ", "ボス", "بوس", "שלום", "13", "(13)", "((", "RX",
    " ", "\xa0",
]  # fmt: skip
UNSTORABLE = ["\x00", "\n", "\r\n", "\r"]  # NUL anywhere, a line break in a title or genre: refused
ID3_GENRE_CODES = ["13", "(13)Synth", "RX", "CR", "((x", "\u0661\u0663"]  # the last: 13 in Arabic-Indic digits


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string: quote, backslash and every control character escaped."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def write_toml(prompts_dir: Path, name: str, **fields: str) -> Path:
    prompts_dir.mkdir(parents=True, exist_ok=True)
    text = "".join(f"{key} = {toml_string(value)}\n" for key, value in fields.items())
    assert tomllib.loads(text) == fields  # the escaper is right, so the test checks tydust-gen, not itself
    path = prompts_dir / f"{name}.toml"
    path.write_bytes(text.encode("utf-8"))
    return path


def all_tag_text(mp3: Path, ogg: Path) -> str:
    """Every tag value of both files (all ID3 frames, all Vorbis comments) as one string."""
    frames = [f"{key}={frame!r}" for key, frame in ID3(mp3).items()]
    comments = [f"{key}={value}" for key, value in (OggVorbis(ogg).tags or [])]
    return "\n".join(frames + comments)


def read_tags(mp3: Path, ogg: Path) -> dict[str, list]:
    id3 = ID3(mp3)
    vorbis = OggVorbis(ogg).tags
    comms = id3.getall("COMM")
    return {
        "mp3_title": id3["TIT2"].text,
        "mp3_genre": id3["TCON"].text if "TCON" in id3 else None,
        "mp3_comment": [c.text for c in comms],
        "mp3_txxx": [str(f) for f in id3.getall("TXXX")],
        "ogg_title": vorbis.get("title"),
        "ogg_genre": vorbis.get("genre"),
        "ogg_comment": vorbis.get("comment"),
    }


@pytest.fixture(scope="module")
def ffmpeg():
    ff = find_ffmpeg()
    check_encoders(ff)
    return ff


# --- item: text that looks like an MP3 header must not change verification ---


def test_prompt_and_title_that_name_mp3_headers_render_and_verify(workdir, run_cli):
    """ "Info"/"Xing" in the ID3 tag were taken for the gapless header: 50145261 s instead of 3 s."""
    write_toml(workdir / "prompts", "boss", prompt="Info: dark synth boss theme", title="Xing")
    result = run_cli("boss", "-d", "3", "--seed", "1", "-o", "out", "--json")
    assert result.exit_code == 0, result.stderr
    out = workdir / "out"
    mp3, ogg = out / "boss.mp3", out / "boss.ogg"
    assert abs(mp3_gapless_duration(mp3, 44_100) - 3.0) < 0.001
    assert abs(decoded_duration(mp3) - 3.0) < 0.001  # ffmpeg, reading the same file independently
    track = json.loads(result.stdout)["tracks"][0]
    assert [round(f["duration_s"], 3) for f in track["files"]] == [3.0, 3.0]
    tags = read_tags(mp3, ogg)
    assert tags["mp3_title"] == ["Xing"] and tags["ogg_title"] == ["Xing"]
    assert tags["mp3_comment"][0][0].startswith("Info: dark synth boss theme | seed=1 | model=")
    assert tags["ogg_comment"][0].startswith("Info: dark synth boss theme | seed=1 | model=")


# --- item: hostile text through the real CLI (a few hand-picked runs; the property test below covers the rest) ---

CLI_CASES = {
    "unicode_and_toml_hostile": dict(
        prompt='LAME OggS fLaC "quoted" \\back\\slash 戦闘 👾 بوس',
        title='Boss "Ω" \\ 🎮 \u202eRTL\x1b[0m ID3 TAG',
        genre="vorbis / RIFF \t chiptune",
        folder="boss",
    ),
    "magic_words_only": dict(prompt="Xing Info LAME ID3 TAG OggS vorbis RIFF fLaC", title="Info", genre="Xing", folder="b"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_hostile_prompt_files_render_and_tags_read_back(workdir, run_cli, case):
    fields = CLI_CASES[case]
    write_toml(workdir / "prompts", "t", **fields)
    result = run_cli("t", "-d", "0.6", "--seed", "3", "-o", "out")
    assert result.exit_code == 0, result.stderr
    out = workdir / "out"
    tags = read_tags(out / "t.mp3", out / "t.ogg")
    assert tags["mp3_title"] == [fields["title"]] == tags["ogg_title"]
    assert tags["mp3_genre"] == [fields["genre"]] == tags["ogg_genre"]
    expected = f"{fields['prompt']} | seed=3 | model="
    assert tags["mp3_comment"][0][0].startswith(expected) and tags["ogg_comment"][0].startswith(expected)
    record = json.loads((out / "t.json").read_text(encoding="utf-8"))
    assert record["metadata"]["title"] == fields["title"] and record["prompt"]["text"] == fields["prompt"]


def test_txt_prompt_of_magic_words_renders(workdir, run_cli):
    prompt = "OggS\x03vorbis RIFF....WAVE fLaC TAG ID3\x04 Info Xing LAME 🎮"
    (workdir / "prompts" / "magic.txt").write_bytes(prompt.encode("utf-8"))
    result = run_cli("magic", "-d", "0.6", "--seed", "5", "-o", "out")
    assert result.exit_code == 0, result.stderr
    tags = read_tags(workdir / "out/magic.mp3", workdir / "out/magic.ogg")
    assert tags["mp3_comment"][0][0].startswith(f"{prompt} | seed=5 | model=")
    assert tags["ogg_comment"][0].startswith(f"{prompt} | seed=5 | model=")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(prompt="calm", title="Boss\x00Theme"), "title contains a NUL character (U+0000, at character 5)"),
        (dict(prompt="calm\x00synth"), "prompt contains a NUL character"),
        (dict(prompt="calm", genre="13", folder="x"), "genre '13' would show in players as an ID3 genre code"),
        (dict(prompt="calm", genre="synth\nwave", folder="x"), "genre contains a line break"),
        (dict(prompt="calm", title="Boss\r\nTheme"), "title contains a line break"),
        (dict(prompt="calm", genre="(13)Synth", folder="x"), "genre '(13)Synth' would show in players as an ID3 genre code"),
    ],
)
def test_text_the_tags_cannot_carry_is_refused_before_the_model_loads(workdir, run_cli, no_model_load, fields, message):
    write_toml(workdir / "prompts", "t", **fields)
    before = files_under(workdir)
    result = run_cli("t", "-d", "0.6", "-o", "out")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert files_under(workdir) == before and not (workdir / "out").exists()


def test_nul_in_a_txt_prompt_is_refused(workdir, run_cli, no_model_load):
    (workdir / "prompts" / "t.txt").write_bytes(b"calm\x00synth")
    result = run_cli("t", "-o", "out")
    assert result.exit_code == 2 and "prompt contains a NUL character" in result.stderr
    assert not (workdir / "out").exists()


# --- property: arbitrary text through the prompt parser and the export stage ---

_chars = st.characters(exclude_categories=("Cs",))  # a UTF-8 file cannot hold lone surrogates
_text = st.text(_chars, min_size=1, max_size=12)
_piece = st.one_of(st.sampled_from(MAGIC_WORDS), st.sampled_from(HOSTILE), _text, _text, st.sampled_from(UNSTORABLE))
_field = st.lists(_piece, min_size=1, max_size=4).map("".join)
_genre = st.one_of(_field, _field, _field, st.sampled_from(ID3_GENRE_CODES))


def _fields_to_refuse(prompt: str, title: str, genre: str) -> set[str]:
    """The fields the prompt parser must refuse (empty, NUL, line break, ID3 genre code: base/prompts.py).

    Besides the documented genre rule, any genre that mutagen's own ID3 reader
    would not give back as written must be refused too, so a gap in the rule shows.
    """
    import re

    fields = {"prompt": " ".join(prompt.split()), "title": title.strip(), "genre": genre.strip()}
    bad = {key for key, value in fields.items() if not value or "\x00" in value}
    bad |= {key for key in ("title", "genre") if "\n" in fields[key] or "\r" in fields[key]}
    g = fields["genre"]
    if re.fullmatch(r"\d+|RX|CR|\((?:\d+|RX|CR)\).*|\(\(.*", g, re.DOTALL) or (g and TCON(encoding=3, text=[g]).genres != [g]):
        bad.add("genre")
    return bad


_FAST = dict(deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _plan(root: Path, **fields: str):
    write_toml(root / "prompts", "t", **fields, folder="music")
    cli = {"seed": "7", "duration": "0.4"}
    return plan_track("t", cli_settings=cli, prompts_dir=root / "prompts", out_dir=root / "out", overwrite=False)


@settings(max_examples=300, **_FAST)
@given(prompt=_field, title=_field, genre=_genre)
def test_prompt_files_with_any_text_parse_exactly_or_are_refused_with_one_line(prompt, title, genre):
    """Parsing only (cheap): refused exactly when a documented rule says so, else kept as typed."""
    refuse = _fields_to_refuse(prompt, title, genre)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        where = root / "prompts" / "t.toml"
        try:
            plan = _plan(root, prompt=prompt, title=title, genre=genre)
        except PromptError as exc:
            message = str(exc)
            assert refuse, f"refused without cause: {message}"
            assert "\n" not in message and "\r" not in message
            named = {k for k in refuse if message.startswith(f"{where}: {k} ")}
            named |= {"prompt"} if message == f"{where} has an empty prompt; write a description of the music in it" else set()
            assert named, f"{message!r} names none of {refuse}"
            assert not (root / "out").exists()
            event(f"refused: {sorted(refuse)}")
            return
    assert not refuse, f"{refuse} should have been refused"
    event("kept")
    assert (plan.spec.prompt, plan.spec.title, plan.spec.genre) == (" ".join(prompt.split()), title.strip(), genre.strip())


_storable_chars = st.characters(exclude_categories=("Cs",), exclude_characters="\x00\r\n")
_storable_text = st.text(_storable_chars, min_size=1, max_size=12)
_storable = st.lists(
    st.one_of(st.sampled_from(MAGIC_WORDS), st.sampled_from(HOSTILE), _storable_text, _storable_text), min_size=1, max_size=4
).map("".join)


@settings(max_examples=25, **_FAST)
@given(prompt=_storable, title=_storable, genre=_storable)
def test_any_storable_text_reads_back_from_both_files(ffmpeg, prompt, title, genre):
    """Through the parser and the real export stage (encode, tag, verify, publish), then read back with mutagen."""
    assume(not _fields_to_refuse(prompt, title, genre))  # blank after stripping, or a genre such as "13"
    with tempfile.TemporaryDirectory() as tmp:
        plan = _plan(Path(tmp), prompt=prompt, title=title, genre=genre)
        spec = plan.spec
        tags = TrackTags(title=spec.title, genre=spec.genre, comment=comment_for(plan, "org/model"), bpm=spec.bpm)
        t = torch.arange(round(0.4 * 44_100)) / 44_100
        wave = Waveform((0.3 * torch.sin(2 * torch.pi * 330 * t)).expand(2, -1).contiguous(), 44_100)
        mp3_file, _ = export.export_track(wave, plan.out_dir, "t", tags, ffmpeg=ffmpeg)  # verifies the length
        assert abs(mp3_file.duration_s - 0.4) < 0.001
        back = read_tags(plan.out_dir / "t.mp3", plan.out_dir / "t.ogg")
    assert (spec.prompt, spec.title, spec.genre) == (" ".join(prompt.split()), title.strip(), genre.strip())
    assert back["mp3_title"] == [spec.title] == back["ogg_title"]
    assert back["mp3_genre"] == [spec.genre] == back["ogg_genre"]
    assert back["mp3_comment"] == [[tags.comment]] and back["ogg_comment"] == [tags.comment]
    assert back["mp3_txxx"] == []
    assert tags.comment.startswith(f"{spec.prompt} | seed=7 | model=org/model")


# --- item: no local path in the tags ---


def test_model_folder_path_is_kept_out_of_the_tags(workdir, run_cli, tiny_model_dir):
    parent = workdir / "home-alice-private" / "secret-models"
    model_dir = parent / "tiny-musicgen"
    shutil.copytree(tiny_model_dir, model_dir)
    write_toml(workdir / "prompts", "t", prompt="calm synth menu music", title="Menu")
    result = run_cli("t", "-d", "0.6", "--seed", "2", "-o", "out", "--model", str(model_dir))
    assert result.exit_code == 0, result.stderr
    out = workdir / "out"
    text = all_tag_text(out / "t.mp3", out / "t.ogg")
    for component in parent.parts[1:]:
        assert component not in text, f"{component!r} of the model path is in a tag:\n{text}"
    assert "/" not in text  # no path of any kind
    tags = read_tags(out / "t.mp3", out / "t.ogg")
    assert tags["mp3_comment"] == [["calm synth menu music | seed=2 | model=tiny-musicgen (mono)"]]
    assert tags["ogg_comment"] == ["calm synth menu music | seed=2 | model=tiny-musicgen (mono)"]
    record = json.loads((out / "t.json").read_text(encoding="utf-8"))
    assert record["model"]["local_dir"] == str(model_dir.resolve()) and record["model"]["ref"] == str(model_dir)


def test_model_tag_id_never_a_path(tmp_path):
    hub = ModelSource(ref="facebook/musicgen-small", local_dir=None, hub_id="facebook/musicgen-small")
    assert model_tag_id(hub) == "facebook/musicgen-small"
    snapshot = tmp_path / "hub" / "models--facebook--musicgen-small" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert model_tag_id(ModelSource(ref=str(snapshot), local_dir=snapshot, hub_id=None)) == "facebook/musicgen-small"
    for saved, expected in [
        ("facebook/musicgen-medium", "facebook/musicgen-medium"),
        (str(tmp_path / "elsewhere" / "ckpt"), "my-finetune"),
        ("./musicgen-small", "my-finetune"),
        ("~/models/x", "my-finetune"),
        (None, "my-finetune"),
    ]:
        folder = tmp_path / "users" / "alice" / "my-finetune"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps({} if saved is None else {"_name_or_path": saved}))
        assert model_tag_id(ModelSource(ref=str(folder), local_dir=folder, hub_id=None)) == expected


# --- item: the comment is a real COMM frame ---


def test_comment_is_a_comm_frame_players_show(tmp_path, ffmpeg):
    t = torch.arange(round(0.5 * 44_100)) / 44_100
    wave = Waveform((0.2 * torch.sin(2 * torch.pi * 440 * t)).expand(2, -1).contiguous(), 44_100)
    tags = TrackTags(title="T", genre="synthwave", comment="made | seed=1 | model=org/m")
    export.export_track(wave, tmp_path, "t", tags, ffmpeg=ffmpeg)
    id3 = ID3(tmp_path / "t.mp3")
    comms = id3.getall("COMM")
    assert len(comms) == 1 and comms[0].lang == "eng" and comms[0].desc == "" and comms[0].text == ["made | seed=1 | model=org/m"]
    assert id3.getall("TXXX") == []
    assert MP3(tmp_path / "t.mp3").tags.getall("COMM::eng")[0].text == ["made | seed=1 | model=org/m"]
    assert OggVorbis(tmp_path / "t.ogg")["comment"] == ["made | seed=1 | model=org/m"]
