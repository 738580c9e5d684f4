"""``tydust-gen master FILE...`` through the real CLI, on recorded music, and ``generate --loop --bars`` on the tiny model.

The recorded music is the drum loop pygame ships as an example sound
(``pygame/examples/data/house_lo.wav``: 7.1 s of 8-bit 11 kHz mono house, four
bars at about 135 bpm); pygame is a test dependency.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import files_under
from synth import SR, ambient, groove

from tydust_gen.audio import loop as loop_stage
from tydust_gen.audio import master as master_stage
from tydust_gen.export.loudness import decode_audio
from tydust_gen.export.tags import read_loop_tags
from tydust_gen.export.verify import sha256_file


@pytest.fixture(scope="module")
def house_lo() -> Path:
    pygame = pytest.importorskip("pygame")
    path = Path(pygame.__file__).parent / "examples" / "data" / "house_lo.wav"
    if not path.is_file():
        pytest.skip("pygame's example sounds are not installed")
    return path


def write_wav(path: Path, samples: np.ndarray, sr: int = SR) -> Path:
    from scipy.io import wavfile

    wavfile.write(path, sr, np.ascontiguousarray(samples.T, dtype=np.float32))
    return path


def master_json(run_cli, *args):
    result = run_cli("master", *args, "--json", model=False)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)["tracks"], result.stderr


def one_line_error(result, code: int, text: str) -> None:
    assert result.exit_code == code, result.stderr
    assert text in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("bars", [2, 3])
def test_master_loop_bars_on_recorded_music(tmp_path, run_cli, house_lo, bars):
    (track,), stderr = master_json(run_cli, str(house_lo), "--loop", "--bars", str(bars), "-o", str(tmp_path / "out"))
    out = tmp_path / "out"
    assert files_under(out) == ["house_lo.json", "house_lo.mp3", "house_lo.ogg"]
    lp = track["loop"]
    assert lp["mode"] == "bars" and lp["bars"] == bars and lp["beat_clear"] and lp["tempo_confidence"] >= 0.1
    assert 130.0 < lp["bpm"] < 140.0  # a house loop; its four bars last 7.1 s
    n = lp["loop_length"]
    # exactly N bars at the detected tempo: at the loop's own tempo to the sample, the fitted one within 0.2 %
    assert n == round(bars * 4 * 60.0 / lp["loop_bpm"] * 44_100)
    assert abs(n - bars * 4 * 60.0 / lp["bpm"] * 44_100) <= 0.002 * n
    assert abs(lp["loop_bpm"] - lp["bpm"]) <= 0.002 * lp["bpm"]
    decoded = decode_audio(out / "house_lo.ogg")
    assert decoded.shape == (2, n)  # OGG is sample-exact: the file is the loop
    tags = read_loop_tags(out / "house_lo.ogg")
    assert (tags.start, tags.length) == (0, n)
    assert lp["seam_passed"] and lp["seam_beat_judged"] and abs(lp["seam_beat_phase_ms"]) <= 20.0
    assert lp["downbeats"] == [round(k * n / bars) for k in range(bars)]
    # the seam of the decoded file, measured again at the file's own tempo
    report = loop_stage.seam_metric(decoded, 44_100, beat_period_s=n / (bars * 4) / 44_100)
    assert report.passed and abs(report.beat_phase_ms) <= 20.0, report
    assert f"loop: {bars} bars of 4/4 at" in stderr and "seamless" in stderr
    # tags: the detected tempo when none was given, and where the file came from
    from mutagen.id3 import ID3
    from mutagen.oggvorbis import OggVorbis

    assert ID3(out / "house_lo.mp3")["TBPM"].text == [str(round(lp["bpm"]))]
    assert OggVorbis(out / "house_lo.ogg")["bpm"] == [str(round(lp["bpm"]))]
    record = json.loads((out / "house_lo.json").read_text())
    assert record["format"] == "tydust-gen/master" and record["source"]["sha256"] == sha256_file(house_lo)
    assert record["source"]["sample_rate"] == 11_025 and record["mastering"]["bars"] == bars
    assert record["result"]["loop"]["bpm"] == lp["bpm"] and record["result"]["loop"]["beats"] == lp["beats"]
    assert [f["path"] for f in record["files"]] == ["house_lo.mp3", "house_lo.ogg"]


def test_master_without_loop_keeps_the_whole_file(tmp_path, run_cli, house_lo):
    (track,), stderr = master_json(run_cli, str(house_lo), "-o", str(tmp_path / "out"), "--preview", "--bpm", "135")
    out = tmp_path / "out"
    assert files_under(out) == ["house_lo.json", "house_lo.mp3", "house_lo.ogg", "house_lo.png"]
    source_s = track["source"]["duration_s"]
    assert abs(source_s - 78_331 / 11_025) < 1e-6
    decoded = decode_audio(out / "house_lo.ogg")
    assert abs(decoded.shape[1] - source_s * 44_100) <= 1  # 11 kHz mono → 44.1 kHz stereo, same length
    assert np.allclose(decoded[0], decoded[1], atol=1e-3)  # mono source: both channels alike
    assert abs(master_stage.measure_loudness(decoded, 44_100) + 14.0) <= 0.5
    assert master_stage.true_peak(decoded, 44_100) <= -1.0 + 1e-6
    assert track["loop"] is None
    from mutagen.id3 import ID3

    assert ID3(out / "house_lo.mp3")["TBPM"].text == ["135"]  # --bpm is the tag when given


def test_master_trims_and_fades(tmp_path, run_cli):
    src = write_wav(tmp_path / "theme.wav", groove(6.0, bpm=120.0))
    (track,), _ = master_json(run_cli, str(src), "-d", "4", "--fade-out", "1", "-o", str(tmp_path / "out"))
    x = decode_audio(tmp_path / "out/theme.ogg")
    assert x.shape[1] == 4 * 44_100
    rms = lambda a: float(np.sqrt(np.mean(a**2)))  # noqa: E731
    assert rms(x[:, -441:]) < 0.1 * rms(x[:, 44_100:2 * 44_100])


def test_master_loop_of_music_without_a_beat_says_so(tmp_path, run_cli):
    src = write_wav(tmp_path / "pads.wav", ambient(12.0, seed=5))
    (track,), stderr = master_json(run_cli, str(src), "--loop", "-d", "6", "-o", str(tmp_path / "out"))
    lp = track["loop"]
    assert lp["mode"] == "plain" and lp["loop_length"] == 6 * 44_100 and lp["bpm"] is None
    assert "no clear beat" in lp["note"] and "no clear beat" in stderr
    assert decode_audio(tmp_path / "out/pads.ogg").shape[1] == 6 * 44_100
    from mutagen.id3 import ID3

    assert "TBPM" not in ID3(tmp_path / "out/pads.mp3")  # no tempo, no tag


def test_master_refuses_to_overwrite_without_force(tmp_path, run_cli, house_lo):
    out = tmp_path / "out"
    master_json(run_cli, str(house_lo), "-o", str(out), "--loudness", "-20")
    before = sha256_file(out / "house_lo.mp3")
    result = run_cli("master", str(house_lo), "-o", str(out), model=False)
    one_line_error(result, 2, "already exists; pass --force to replace it")
    assert sha256_file(out / "house_lo.mp3") == before
    master_json(run_cli, str(house_lo), "-o", str(out), "--force")
    assert sha256_file(out / "house_lo.mp3") != before  # -14 LUFS now


def test_master_refuses_to_replace_its_own_source(tmp_path, run_cli, house_lo):
    shutil.copy(house_lo.with_suffix(".mp3"), tmp_path / "house_lo.mp3")
    result = run_cli("master", str(tmp_path / "house_lo.mp3"), "-o", str(tmp_path), "--force", model=False)
    one_line_error(result, 2, "would be replaced by its own master; pick another --out-dir")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.wav", "does not exist or is not a file"),
        (lambda d: (d / "notes.wav").write_text("this is not audio") and d / "notes.wav", "ffmpeg cannot read it as audio"),
        (lambda d: write_wav(d / "quiet.wav", np.zeros((2, SR), dtype=np.float32)), "is silent"),
        (lambda d: write_wav(d / "hiss.wav", np.full((2, SR), 1e-6, dtype=np.float32)), "is silent"),
    ],
    ids=["missing", "not-audio", "silent", "dither-level"],
)
def test_unusable_files_exit_2_before_anything_is_written(tmp_path, run_cli, house_lo, make, message):
    bad = make(tmp_path)
    # the good file first: nothing of it may be written either
    result = run_cli("master", str(house_lo), str(bad), "-o", str(tmp_path / "out"), model=False)
    one_line_error(result, 2, message)
    assert not (tmp_path / "out").exists()


def test_too_many_bars_exit_2_before_anything_is_written(tmp_path, run_cli, house_lo):
    result = run_cli("master", str(house_lo), "--loop", "--bars", "4", "-o", str(tmp_path / "out"), model=False)
    one_line_error(result, 2, "ask for fewer bars")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bars", "2"], "bars sets the length of a loop; add --loop"),
        (["--loop", "--bars", "0"], "bars must be between 1 and"),
        (["--loop", "--meter", "4"], "meter must be a time signature"),
        (["--bpm", "fast"], "bpm 'fast' is not a number"),
        (["--loop", "--fade-in", "1"], "a loop cannot fade in or out"),
        (["-d", "60"], "is longer than"),
    ],
)
def test_bad_options_exit_2(tmp_path, run_cli, house_lo, args, message):
    result = run_cli("master", str(house_lo), *args, "-o", str(tmp_path / "out"), model=False)
    one_line_error(result, 2, message)


def test_two_files_with_one_name_are_refused(tmp_path, run_cli, house_lo):
    result = run_cli("master", str(house_lo), str(house_lo.with_suffix(".ogg")), "-o", str(tmp_path / "out"), model=False)
    one_line_error(result, 2, "would both be written as house_lo.mp3")


def test_a_name_another_process_writes_is_busy(tmp_path, run_cli, house_lo):
    from tydust_gen.runs.locks import TrackLocks

    with TrackLocks() as locks:
        locks.acquire(tmp_path / "out", "house_lo")
        result = run_cli("master", str(house_lo), "-o", str(tmp_path / "out"), model=False)
    one_line_error(result, 4, "is being written by another tydust-gen")


def test_regenerate_refuses_a_master_record(tmp_path, run_cli, house_lo):
    master_json(run_cli, str(house_lo), "-o", str(tmp_path / "out"))
    result = run_cli("regenerate", str(tmp_path / "out/house_lo.json"), model=False)
    one_line_error(result, 2, "is not a tydust-gen provenance record")


# ------------------------------------------------------------- generate --loop on the bar


def test_generate_loop_bars_without_a_clear_beat_is_a_plain_loop(workdir, run_cli):
    # the tiny random model makes no beat: the loop is 2 bars at the prompt file's 80 bpm, by length
    result = run_cli("menu_calm", "-d", "4", "--loop", "--bars", "2", "--seed", "2", "-o", "out", "--json")
    assert result.exit_code == 0, result.stderr
    (track,) = json.loads(result.stdout)["tracks"]
    lp = track["loop"]
    assert lp["mode"] == "plain" and not lp["beat_clear"] and lp["loop_length"] == 6 * 44_100
    assert "no clear beat" in result.stderr
    assert decode_audio(workdir / "out/menu_calm.ogg").shape[1] == 6 * 44_100
    record = json.loads((workdir / "out/menu_calm.json").read_text())
    assert record["mastering"]["bars"] == 2 and record["result"]["loop"]["tempo_confidence"] < 0.1


def test_generate_loop_on_the_bar_when_the_music_has_a_beat(workdir, run_cli, monkeypatch):
    """The pipeline's loop stage on music with a beat: the model's decoded audio is a 123 bpm groove."""
    import torch

    from tydust_gen.base.waveform import Waveform
    from tydust_gen.model import generate as model_generate

    def groove_instead(loaded, codes, lead_in=None):
        seconds = codes.shape[-1] / loaded.frame_rate
        mono = groove(seconds, bpm=123.0, sr=loaded.sample_rate, pickup_beats=3)[0]
        return [Waveform(torch.from_numpy(mono)[None], loaded.sample_rate) for _ in range(codes.shape[0])]

    monkeypatch.setattr(model_generate, "decode_codes", groove_instead)
    result = run_cli("game_over", "-d", "9", "--loop", "--seed", "1", "-o", "out", "--json")
    assert result.exit_code == 0, result.stderr
    (track,) = json.loads(result.stdout)["tracks"]
    lp = track["loop"]
    assert lp["mode"] == "bars" and lp["bars"] == 5  # 9 s is 4.6 bars of 1.951 s
    assert abs(lp["bpm"] - 123.0) < 1.23 and lp["seam_passed"] and abs(lp["seam_beat_phase_ms"]) <= 10.0
    # 5 bars to 1 ms: the bass of bar 6 differs from bar 1's, so the refinement has only the drums to go by
    assert abs(lp["loop_length"] - 5 * 4 * 60 / 123 * 44_100) <= 44
    assert track["files"][0]["duration_s"] == pytest.approx(lp["loop_length"] / 44_100, abs=0.05)
    assert decode_audio(workdir / "out/game_over.ogg").shape[1] == lp["loop_length"]
    from mutagen.id3 import ID3

    assert ID3(workdir / "out/game_over.mp3")["TBPM"].text == ["123"]  # game_over.txt gives no bpm
    assert "loop: 5 bars of 4/4 at 123.0 bpm" in result.stderr


@pytest.mark.parametrize("seconds", [3.0, 3.5, 4.0, 4.5, 5.0, 5.3])
def test_beat_phase_of_plain_loops_of_recorded_music_is_what_their_length_predicts(house_lo, seconds):
    """Today's loops of the house loop: the seam's beat phase is the loop's length modulo the beat, to 5 ms."""
    from tydust_gen.audio.beats import detect_beats
    from tydust_gen.export.ffmpeg import find_ffmpeg
    from tydust_gen.runs.mastering import _to_44k1, read_audio

    samples, rate, _ = read_audio(find_ffmpeg(), house_lo)
    x = master_stage.remove_dc(_to_44k1(samples, rate), 44_100)
    grid = detect_beats(x, 44_100)
    period_ms = 60_000.0 / grid.bpm
    loop = loop_stage.make_loop(x, 44_100, int(round(seconds * 44_100)))
    report = loop_stage.seam_metric(loop.samples, 44_100, beat_period_s=period_ms / 1000)
    beats = seconds * 1000 / period_ms
    expected = ((beats + 0.5) % 1.0 - 0.5) * period_ms
    assert report.beat_judged and abs(report.beat_phase_ms - expected) <= 5.0, (report.beat_phase_ms, expected)
    assert report.passed == (abs(expected) <= loop_stage.SEAM_BEAT_TOLERANCE_MS and report.step_score <= report.step_threshold
                             and report.flux <= report.flux_threshold)  # fmt: skip


def test_a_rate_the_resampler_cannot_take_is_converted_by_ffmpeg_first(tmp_path, run_cli):
    """44,099 Hz shares no factor with 44.1 kHz: torchaudio's filter bank for it would take 7.8 GB. The file
    is decoded at 48 kHz by ffmpeg instead and mastered as usual; the record keeps both rates."""
    from tydust_gen.audio import resample as audio
    from tydust_gen.base.errors import UsageError
    from tydust_gen.base.waveform import Waveform

    import torch

    assert audio.filter_bank_bytes(44_099, 44_100) > 1e9
    with pytest.raises(UsageError, match="44099 Hz audio cannot be resampled"):
        audio.resample(Waveform(torch.zeros(1, 10), 44_099))
    with pytest.raises(UsageError, match="44099 Hz audio cannot be resampled"):
        audio.to_44k1_stereo(Waveform(torch.zeros(1, 10), 44_099), 1.0)
    for rate in (4_000, 8_000, 11_025, 16_000, 22_050, 24_000, 32_000, 48_000, 88_200, 96_000, 192_000, 768_000):
        assert audio.filter_bank_bytes(rate, 44_100) <= audio.RESAMPLE_BANK_LIMIT_BYTES, rate
    odd = write_wav(tmp_path / "odd.wav", groove(6.0, bpm=120.0, sr=44_099), sr=44_099)
    (track,), _ = master_json(run_cli, str(odd), "-o", str(tmp_path / "out"))
    record = json.loads((tmp_path / "out" / "odd.json").read_text())
    assert (record["source"]["sample_rate"], record["source"]["decoded_rate"]) == (44_099, 48_000)
    assert abs(decode_audio(tmp_path / "out" / "odd.ogg").shape[1] - 6.0 * 44_100) <= 2
