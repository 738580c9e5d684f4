"""Seamless loops: exact length, seam metric (loop passes, hard cut fails), loop tags."""

from __future__ import annotations

import numpy as np
import pytest
from synth import SR, encode, music

from tydust_gen.audio.loop import (
    loop_length_samples,
    make_loop,
    naive_loop,
    seam_metric,
)
from tydust_gen.audio.master import master, remove_dc
from tydust_gen.base.errors import ExportError, SettingsError
from tydust_gen.export.tags import LoopPoints, read_loop_tags, write_loop_tags

N = 10 * SR  # 5.125 bars at 123 bpm


def smooth(report) -> bool:
    """The sample-step and spectral-flux parts of the seam metric (the whole metric before beat phase)."""
    return report.step_score <= report.step_threshold and report.flux <= report.flux_threshold


@pytest.mark.parametrize(("seed", "bpm"), [(0, 123.0), (3, 132.0), (4, 135.0)])
def test_plain_loop_is_smooth_and_hard_cut_clicks(seed, bpm):
    raw = remove_dc(music(13.0, seed=seed, bpm=bpm, dc=0.3), SR)
    loop = make_loop(raw, SR, N)
    assert loop.samples.shape == (2, N) and loop.loop_start == 0 and loop.loop_length == N
    assert 0 <= loop.source_offset <= 13 * SR - N - loop.crossfade_samples
    good, bad = seam_metric(loop.samples, SR), seam_metric(naive_loop(raw, N), SR)
    assert smooth(good), good
    assert not bad.passed, bad
    assert bad.step_score > 1.5 * bad.step_threshold  # a click, not a borderline call
    assert good.step_score < bad.step_score
    # 10 s is 20.5 beats at 123 and 22.5 at 135 bpm: smooth, but the groove skips half a beat at
    # every wrap and only the beat phase sees it; at 132 bpm it is 22 whole beats and passes
    period_ms = 60_000.0 / bpm
    assert good.beat_judged and abs(good.beat_period_ms - period_ms) < 0.01 * period_ms
    if bpm == 132.0:
        assert good.passed and abs(good.beat_phase_ms) <= 20.0
    else:
        assert not good.passed and abs(good.beat_phase_ms) > 0.4 * period_ms


def test_wrap_is_the_original_continuation():
    raw = remove_dc(music(13.0, seed=0, dc=0.3), SR)
    loop = make_loop(raw, SR, N)
    s = loop.source_offset
    assert np.array_equal(loop.samples[:, -1], raw[:, s + N - 1])
    assert np.allclose(loop.samples[:, 0], raw[:, s + N], atol=1e-7)
    assert np.array_equal(loop.samples[:, loop.crossfade_samples :], raw[:, s + loop.crossfade_samples : s + N])


def test_search_finds_the_true_period():
    # a strictly periodic signal whose period divides neither the loop length nor the
    # overrun start: the best offset makes the crossfaded passages identical
    t = np.arange(13 * SR) / SR
    x = np.sin(2 * np.pi * 3.0 * t) * np.sin(2 * np.pi * 220.0 * t)
    loop = make_loop(np.stack([x, x]), SR, loop_length_samples(10.0, SR))
    assert loop.correlation > 0.99


def test_circular_mastering_keeps_the_seam(encoded_loop):
    # the fixture is a plain 10 s loop of 123 bpm music: smooth, half a beat off (see above); mastering
    # and encoding must keep it exactly that
    before = seam_metric(encoded_loop.loop.samples, SR)
    after = seam_metric(encoded_loop.encoded.master.samples, SR)
    assert smooth(before) and smooth(after)
    assert abs(after.beat_phase_ms - before.beat_phase_ms) < 2.0


def test_loop_errors():
    raw = np.zeros((2, 11 * SR), dtype=np.float32)
    with pytest.raises(SettingsError, match="overrun"):
        make_loop(raw, SR, N, crossfade_s=1.5)
    with pytest.raises(SettingsError):
        make_loop(raw, SR, N, crossfade_s=0.0)
    with pytest.raises(SettingsError):
        loop_length_samples(-1.0, SR)


def test_loop_tags_read_back_from_a_real_ogg(tmp_path):
    ogg = encode(music(3.0), SR, tmp_path / "t.ogg")
    assert read_loop_tags(ogg) is None
    write_loop_tags(ogg, 0, 3 * SR)
    assert read_loop_tags(ogg) == LoopPoints(start=0, length=132_300)
    write_loop_tags(ogg, 4410, 88_200)  # rewriting replaces, does not append
    assert read_loop_tags(ogg) == LoopPoints(start=4410, length=88_200)

    from mutagen.oggvorbis import OggVorbis

    tags = OggVorbis(ogg)
    assert tags["LOOPSTART"] == ["4410"] and tags["LOOPLENGTH"] == ["88200"]
    assert tags.info.sample_rate == SR and tags.info.channels == 2


def test_loop_tags_on_encoded_loop(encoded_loop):
    assert read_loop_tags(encoded_loop.ogg) == LoopPoints(0, encoded_loop.loop.loop_length)


def test_loop_tag_errors(tmp_path):
    ogg = encode(music(1.0), SR, tmp_path / "t.ogg")
    with pytest.raises(SettingsError):
        write_loop_tags(ogg, -1, 10)
    with pytest.raises(SettingsError):
        write_loop_tags(ogg, 0, 0)
    not_ogg = tmp_path / "x.ogg"
    not_ogg.write_bytes(b"not an ogg file at all")
    with pytest.raises(ExportError):
        write_loop_tags(not_ogg, 0, 10)
    with pytest.raises(ExportError):
        read_loop_tags(not_ogg)


def test_master_circular_smoke():
    raw = remove_dc(music(13.0, seed=3), SR)
    loop = make_loop(raw, SR, N)
    result = master(loop.samples, SR, target_lufs=-11.0, circular=True)
    assert result.limiter_max_reduction_db > 0
    assert smooth(seam_metric(result.samples, SR))


def test_seam_metric_catches_a_chord_jump_without_a_click():
    # chord A, a slow 1 s blend, chord B; every partial completes whole cycles in 4 s, so the
    # wrap B -> A lines up sample-wise (no click) but the harmony jumps
    t = np.arange(4 * SR) / SR
    chord_a = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.25, 329.5)) / 3
    chord_b = sum(np.sin(2 * np.pi * f * t) for f in (196.0, 246.75, 392.0)) / 3
    blend = np.clip((t - 1.5) / 1.0, 0.0, 1.0)
    x = 0.3 * (np.cos(np.pi / 2 * blend) * chord_a + np.sin(np.pi / 2 * blend) * chord_b)
    report = seam_metric(np.stack([x, x]), SR)
    assert report.step_score <= report.step_threshold
    assert report.flux > report.flux_threshold and not report.passed


# ---------------------------------------------------------------- loops on the bar (synthetic music, known tempo)

from synth import ambient, groove, groove_beats  # noqa: E402

from tydust_gen.audio.loop import (  # noqa: E402
    _matched_crossfade,
    loop_source_length_s,
    loop_summary,
    loop_take,
    make_bar_loop,
)
from tydust_gen.audio.beats import detect_beats  # noqa: E402

# (bpm, meter, pickup beats, bars, bpm prior from the prompt file)
BAR_CASES = [
    (123.0, "4/4", 1, 4, None),
    (97.3, "4/4", 2, 3, 97.0),
    (140.0, "3/4", 1, 4, None),
    (174.0, "4/4", 0, 8, 174.0),
]


def bar_groove(bpm, meter, pickup, bars, prior):
    bpb = int(meter.split("/")[0])
    seconds = loop_source_length_s(10.0, bars=bars, beats_per_bar=bpb, bpm_prior=prior or 120.0)
    x = remove_dc(groove(seconds, bpm=bpm, beats_per_bar=bpb, pickup_beats=pickup, seed=bars), SR)
    return x, bpb, seconds


@pytest.mark.parametrize(("bpm", "meter", "pickup", "bars", "prior"), BAR_CASES)
def test_bar_loop_is_exactly_n_bars_from_a_downbeat_and_seamless(bpm, meter, pickup, bars, prior):
    x, bpb, seconds = bar_groove(bpm, meter, pickup, bars, prior)
    take = loop_take(x, SR, duration_s=10.0, bars=bars, meter=meter, bpm_prior=prior)
    info, loop = take.info, take.loop
    exact = bars * bpb * 60.0 / bpm * SR
    assert info["mode"] == "bars" and info["bars"] == bars and info["beat_clear"]
    assert abs(info["bpm"] - bpm) / bpm < 0.01
    assert abs(loop.loop_length - exact) <= 2.0, (loop.loop_length, exact)  # N bars to the sample
    assert loop.samples.shape == (2, loop.loop_length) and info["loop_length"] == loop.loop_length
    # the loop starts on a true downbeat (a few ms early at most: before the attack, never in it)
    _, downbeats = groove_beats(seconds, bpm=bpm, beats_per_bar=bpb, pickup_beats=pickup)
    early_ms = (downbeats[np.abs(downbeats - loop.source_offset).argmin()] - loop.source_offset) / SR * 1000
    assert -2.0 <= early_ms <= 10.0
    assert info["downbeats"][:2] == [0, pytest.approx(loop.loop_length / bars, abs=2)]
    assert all(0 <= b < loop.loop_length for b in info["beats"]) and len(info["beats"]) >= 0.8 * bars * bpb
    # a whole number of beats of crossfade, from the downbeat
    assert loop.crossfade_beats >= 1 and abs(loop.crossfade_samples - loop.crossfade_beats * exact / (bars * bpb)) <= 5  # 0.1 ms
    report = seam_metric(loop.samples, SR, **take.seam_options)
    assert report.passed and report.beat_judged, report
    assert abs(report.beat_phase_ms) <= 10.0, report
    # the metric finds the same without being told the tempo
    own = seam_metric(loop.samples, SR, beats_per_bar=bpb)
    assert own.passed and own.beat_judged and abs(own.beat_phase_ms) <= 20.0, own


@pytest.mark.parametrize(("bpm", "meter", "pickup", "bars", "prior"), BAR_CASES)
def test_the_same_music_looped_half_a_beat_off_fails(bpm, meter, pickup, bars, prior):
    x, bpb, _ = bar_groove(bpm, meter, pickup, bars, prior)
    period = 60.0 / bpm * SR
    for off in (+0.5, -0.5):
        # today's loop folding at a length half a beat off whole bars: smooth sample-wise and spectrally...
        loop = make_loop(x, SR, int(round((bars * bpb + off) * period)))
        report = seam_metric(loop.samples, SR, beat_period_s=period / SR, beats_per_bar=bpb)
        assert smooth(report), report
        # ...but the groove skips: the beat grid after the wrap sits half a beat from the one before
        assert report.beat_judged and abs(abs(report.beat_phase_ms) - 500 * period / SR) <= 25.0, report
        assert not report.passed


def test_bars_nearest_the_duration():
    x = remove_dc(groove(16.0, bpm=123.0, pickup_beats=1), SR)  # a bar is 1.951 s
    grid = detect_beats(x, SR)
    assert make_bar_loop(x, SR, grid, target_length=9 * SR).bars == 5  # 4.61 bars
    assert make_bar_loop(x, SR, grid, target_length=int(8.5 * SR)).bars == 4  # 4.36 bars
    assert make_bar_loop(x, SR, grid, target_length=60 * SR).bars == 7  # as many as fit, with a crossfade
    with pytest.raises(SettingsError, match="ask for fewer bars"):
        make_bar_loop(x, SR, grid, bars=8)


def test_music_without_a_clear_beat_keeps_the_plain_loop_and_says_so():
    x = remove_dc(ambient(13.0, seed=2), SR)
    take = loop_take(x, SR, duration_s=10.0, bpm_prior=80.0)
    assert take.info["mode"] == "plain" and not take.info["beat_clear"]
    assert take.loop.loop_length == 10 * SR and take.loop.bars is None  # exactly --duration, as before
    assert take.info["bpm"] is None and take.info["beats"] == [] and "no clear beat" in take.info["note"]
    report = seam_metric(take.loop.samples, SR, **take.seam_options)
    assert report.passed and not report.beat_judged and report.beat_phase_ms is None
    assert "no clear beat" in loop_summary({**take.info, "seam_passed": report.passed})
    # with --bars and no beat: that many bars at the prompt file's bpm, still a plain loop
    take = loop_take(x, SR, duration_s=30.0, bars=2, bpm_prior=80.0)
    assert take.loop.loop_length == 6 * SR and take.info["mode"] == "plain"


@pytest.mark.parametrize(("prior", "bars", "bpb"), [(120.0, 8, 4), (None, 4, 4), (90.0, 6, 3)])
def test_generated_length_fits_the_bars_at_the_slowest_expected_tempo(prior, bars, bpb):
    from tydust_gen.audio.loop import LOOP_SIZING_BPM, LOOP_TEMPO_SLACK

    slowest = (prior or LOOP_SIZING_BPM) * (1 - LOOP_TEMPO_SLACK)
    seconds = loop_source_length_s(30.0, bars=bars, beats_per_bar=bpb, bpm_prior=prior)
    x = remove_dc(groove(seconds, bpm=slowest, beats_per_bar=bpb, pickup_beats=bpb - 1), SR)
    grid = detect_beats(x, SR, bpm_prior=slowest, beats_per_bar=bpb)
    assert make_bar_loop(x, SR, grid, bars=bars).bars == bars
    # and --loop without --bars: the bars nearest --duration fit too
    seconds = loop_source_length_s(12.0, beats_per_bar=bpb, bpm_prior=prior)
    x = remove_dc(groove(seconds, bpm=slowest, beats_per_bar=bpb, pickup_beats=bpb - 1), SR)
    grid = detect_beats(x, SR, bpm_prior=slowest, beats_per_bar=bpb)
    nearest = max(1, round(12.0 / grid.bar_period * SR))
    assert make_bar_loop(x, SR, grid, target_length=12 * SR).bars == nearest


@pytest.mark.parametrize("r", [0.0, 0.3, 0.9, 1.0])
def test_matched_crossfade_keeps_the_power_of_correlated_passages(r):
    rise, fall = _matched_crossfade(1000, r)
    assert rise[0] == 0.0 and fall[0] == 1.0  # the wrap is the original flow
    power = rise.astype(float) ** 2 + fall.astype(float) ** 2 + 2 * r * rise * fall
    assert np.allclose(power, 1.0, atol=1e-6)
    assert np.all(np.diff(rise) > 0) and np.all(np.diff(fall) < 0)


def test_bar_loop_of_a_repeating_groove_does_not_swell_in_the_crossfade():
    x = remove_dc(groove(16.0, bpm=120.0), SR)
    take = loop_take(x, SR, duration_s=8.0)
    loop = take.loop
    assert take.info["correlation"] > 0.95
    # the crossfaded beat is as loud as the same beat of the next bar (equal power would add 3 dB)
    fade = loop.crossfade_samples
    bar = loop.loop_length // take.info["bars"]
    rms = lambda a: float(np.sqrt(np.mean(a**2)))  # noqa: E731
    assert abs(20 * np.log10(rms(loop.samples[:, :fade]) / rms(loop.samples[:, bar : bar + fade]))) < 0.5


def test_prompt_file_bars_and_meter(tmp_path):
    from tydust_gen.base.prompts import load_track
    from tydust_gen.base.settings import resolve_mastering

    (tmp_path / "waltz.toml").write_text('prompt = "a waltz"\nbpm = 90\nloop = true\nbars = 8\nmeter = "3/4"\n')
    spec = load_track("waltz", tmp_path)
    m = resolve_mastering({}, spec.settings, 30.0)
    assert (m.loop, m.bars, m.meter, spec.bpm) == (True, 8, "3/4", 90.0)
    assert resolve_mastering({"bars": "4", "meter": "6/8"}, spec.settings, 30.0).bars == 4  # the CLI wins
    (tmp_path / "nope.toml").write_text('prompt = "x"\nbars = 8\n')
    with pytest.raises(SettingsError, match="add --loop"):
        resolve_mastering({}, load_track("nope", tmp_path).settings, 30.0)
    (tmp_path / "odd.toml").write_text('prompt = "x"\nmeter = "4/5"\n')
    with pytest.raises(SettingsError, match=r"odd.toml: meter '4/5'"):
        load_track("odd", tmp_path)
