"""The streaming true-peak meter against the whole-array scan, for any way a decoder splits a track.

``encoded_true_peak`` feeds :class:`TruePeakMeter` the decoder's pieces as they
arrive; it must give what :func:`master.true_peak` gives on the whole track, to
float32 rounding: the same neighbours for every sample, silence beyond the ends,
and for a loop the other end across the seam. The reference for the scan itself
is scipy's ``resample_poly`` (tests/test_post_generation.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from synth import music

from tydust_gen.audio import master
from tydust_gen.base.waveform import Waveform
from tydust_gen.export import staging as export
from tydust_gen.export.ffmpeg import find_ffmpeg
from tydust_gen.export.loudness import decode_audio, decoded_pieces, encoded_true_peak
from tydust_gen.export.tags import TrackTags


def streamed(audio: np.ndarray, cuts: list[int], circular: bool) -> float:
    meter = master.TruePeakMeter(audio.shape[0], circular=circular)
    edges = [0, *sorted(c for c in cuts if 0 < c < audio.shape[1]), audio.shape[1]]
    for a, b in zip(edges, edges[1:]):
        meter.feed(audio[:, a:b])
    return meter.true_peak_dbtp()


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(
    n=st.integers(0, 3000),
    channels=st.integers(1, 2),
    cuts=st.lists(st.integers(0, 3000), max_size=12),
    seed=st.integers(0, 2**32 - 1),
    edge=st.sampled_from(["none", "start", "end", "both"]),
    circular=st.booleans(),
)
def test_any_split_gives_the_whole_tracks_true_peak(n, channels, cuts, seed, edge, circular):
    rng = np.random.default_rng(seed)
    audio = (rng.standard_normal((channels, n)) * 0.05).astype(np.float32)
    # the loudest samples at the ends: where the seam (circular) or the silence beyond decides the peak
    if n and edge in ("start", "both"):
        audio[:, : min(n, 3)] = [0.9, -0.9, 0.9][: min(n, 3)]
    if n and edge in ("end", "both"):
        audio[:, -min(n, 3) :] = [0.8, -0.8, 0.8][: min(n, 3)]
    want = master.true_peak(audio, circular=circular)
    got = streamed(audio, cuts, circular)
    if math.isinf(want):
        assert got == want
    else:
        assert got == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("circular", [False, True])
def test_music_in_decoder_sized_pieces(circular):
    audio = music(5.0, seed=3, level=0.6)
    cuts = list(range(65_536, audio.shape[1], 65_536))
    assert streamed(audio, cuts, circular) == pytest.approx(master.true_peak(audio, circular=circular), abs=1e-5)


def test_the_seam_counts_only_for_a_loop():
    """Opposite full-scale samples at the two ends: across the seam they ring above full scale."""
    audio = np.zeros((2, 10_000), np.float32)
    audio[:, -1], audio[:, 0] = 1.0, -1.0
    audio[:, -2], audio[:, 1] = -1.0, 1.0
    assert streamed(audio, [5000], True) > streamed(audio, [5000], False) + 0.5


def test_a_file_is_measured_piece_by_piece_as_decoded_whole(tmp_path):
    audio = master.remove_dc(music(4.0, seed=6, level=0.7), 44_100)
    files = export.export_track(Waveform(__import__("torch").from_numpy(audio), 44_100), tmp_path, "t",
                                TrackTags(title="t", genre=None, comment="c"), ffmpeg=find_ffmpeg())  # fmt: skip
    for f in files:
        whole = decode_audio(f.path)
        pieces = list(decoded_pieces(f.path, piece_frames=10_000))
        assert all(p.shape[1] == 10_000 for p in pieces[:-1])
        assert np.array_equal(np.concatenate(pieces, axis=1), whole)
        for circular in (False, True):
            assert encoded_true_peak(f.path, circular=circular) == pytest.approx(master.true_peak(whole, circular=circular), abs=1e-5)


@pytest.mark.parametrize("circular", [False, True])
def test_a_peak_next_to_a_cut_is_seen(circular):
    """The loudest sample right at, before or after where the decoder's pieces meet."""
    rng = np.random.default_rng(1)
    for spike in range(185, 216):
        audio = (rng.standard_normal((2, 400)) * 0.05).astype(np.float32)
        audio[:, spike] = 0.9
        audio[:, spike + 1] = -0.9  # the intersample peak between them is higher still
        assert streamed(audio, [100, 200, 201], circular) == pytest.approx(master.true_peak(audio, circular=circular), abs=1e-5)


def test_the_result_is_given_once_and_then_the_meter_is_closed():
    """A loop's first samples are measured at the end with the last as neighbours: asking twice must not
    measure them again with other neighbours, and nothing may be fed after."""
    audio = music(1.0, seed=2, level=0.8)
    meter = master.TruePeakMeter(2, circular=True)
    meter.feed(audio)
    first = meter.true_peak_dbtp()
    assert meter.true_peak_dbtp() == first == pytest.approx(master.true_peak(audio, circular=True), abs=1e-5)
    with pytest.raises(ValueError, match="feed a new one"):
        meter.feed(audio)
