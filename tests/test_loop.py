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


@pytest.mark.parametrize(("seed", "bpm"), [(0, 123.0), (3, 132.0), (4, 135.0)])
def test_loop_passes_and_hard_cut_fails(seed, bpm):
    raw = remove_dc(music(13.0, seed=seed, bpm=bpm, dc=0.3), SR)
    loop = make_loop(raw, SR, N)
    assert loop.samples.shape == (2, N) and loop.loop_start == 0 and loop.loop_length == N
    assert 0 <= loop.source_offset <= 13 * SR - N - loop.crossfade_samples
    good, bad = seam_metric(loop.samples, SR), seam_metric(naive_loop(raw, N), SR)
    assert good.passed, good
    assert not bad.passed, bad
    assert bad.step_score > 1.5 * bad.step_threshold  # a click, not a borderline call
    assert good.step_score < bad.step_score


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
    assert seam_metric(encoded_loop.encoded.master.samples, SR).passed


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
    assert seam_metric(result.samples, SR).passed


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
