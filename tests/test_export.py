"""Export stage on real ffmpeg: file properties read back with mutagen, atomicity, no leftovers."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import files_under
from mutagen.mp3 import MP3, BitrateMode
from mutagen.oggvorbis import OggVorbis

from tydust_gen.base.errors import ExportError, FfmpegError, OutputDirError
from tydust_gen.base.waveform import Waveform
from tydust_gen.export import staging as export
from tydust_gen.export.ffmpeg import Ffmpeg, check_encoders, find_ffmpeg
from tydust_gen.export.tags import TrackTags
from tydust_gen.export.verify import decoded_duration, inspect_file, mp3_gapless_duration

TAGS = TrackTags(title="Phase 4 - Peak", genre="darkwave", comment="dark synths | seed=7 | model=tiny", bpm=124)


def stereo(seconds: float) -> Waveform:
    t = torch.arange(round(seconds * 44_100)) / 44_100
    return Waveform((0.3 * torch.sin(2 * torch.pi * 220 * t)).expand(2, -1).contiguous(), 44_100)


@pytest.fixture(scope="module")
def ffmpeg():
    ff = find_ffmpeg()
    check_encoders(ff)
    return ff


def fake_ffmpeg(tmp_path: Path, real: str, body: str) -> str:
    """A wrapper script standing in for ffmpeg: ``body`` runs for encode calls, the rest goes to the real one."""
    script = tmp_path / "ffmpeg"
    script.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *" -i "*) {body} ;; esac\n'
        f'exec "{real}" "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_files_have_the_promised_format(tmp_path, ffmpeg):
    files = export.export_track(stereo(2.5), tmp_path, "track", TAGS, ffmpeg=ffmpeg)
    assert [f.path.name for f in files] == ["track.mp3", "track.ogg"]
    assert files_under(tmp_path) == ["track.mp3", "track.ogg"]

    mp3 = MP3(tmp_path / "track.mp3")
    assert mp3.info.bitrate == 192_000 and mp3.info.bitrate_mode == BitrateMode.CBR
    assert mp3.info.sample_rate == 44_100 and mp3.info.channels == 2
    assert abs(files[0].duration_s - 2.5) < 0.05
    assert mp3.tags["TIT2"].text == ["Phase 4 - Peak"] and mp3.tags["TCON"].text == ["darkwave"]
    assert mp3.tags.getall("COMM")[0].text == ["dark synths | seed=7 | model=tiny"]
    assert mp3.tags["TBPM"].text == ["124"]

    ogg = OggVorbis(tmp_path / "track.ogg")
    assert ogg.info.sample_rate == 44_100 and ogg.info.channels == 2
    assert abs(ogg.info.length - 2.5) < 0.05
    assert ogg["comment"] == ["dark synths | seed=7 | model=tiny"] and ogg["genre"] == ["darkwave"]
    assert files[1].sha256 and files[1].size_bytes == (tmp_path / "track.ogg").stat().st_size


def test_mp3_duration_is_exact_after_removing_encoder_padding(tmp_path, ffmpeg):
    for seconds in (0.37, 1.0, 3.21):
        (f_mp3, _) = export.export_track(stereo(seconds), tmp_path, f"t{seconds}", TAGS, ffmpeg=ffmpeg)
        assert abs(f_mp3.duration_s - seconds) < 0.001
        assert MP3(f_mp3.path).info.length > seconds  # what players without gapless support see


def test_refuses_to_overwrite_without_permission(tmp_path, ffmpeg):
    export.export_track(stereo(0.5), tmp_path, "t", TAGS, ffmpeg=ffmpeg)
    with pytest.raises(FileExistsError):
        export.export_track(stereo(0.7), tmp_path, "t", TAGS, ffmpeg=ffmpeg)
    files = export.export_track(stereo(0.7), tmp_path, "t", TAGS, ffmpeg=ffmpeg, overwrite=True)
    assert abs(files[1].duration_s - 0.7) < 0.05


def test_failed_encode_leaves_previous_take_and_no_temporaries(tmp_path, ffmpeg, private_tmp):
    out = tmp_path / "out"
    export.export_track(stereo(0.5), out, "t", TAGS, ffmpeg=ffmpeg)
    before_bytes = {p: p.read_bytes() for p in out.iterdir()}
    # The OGG encode crashes after writing part of its output, the MP3 one succeeded first.
    body = 'case "$*" in *libvorbis*) for a; do last="$a"; done; echo junk > "$last"; echo "simulated crash" >&2; exit 1 ;; esac'
    broken = Ffmpeg(fake_ffmpeg(tmp_path, ffmpeg.path, body), "test", "fake")
    with pytest.raises(ExportError, match="ffmpeg failed to encode t.ogg: simulated crash"):
        export.export_track(stereo(0.9), out, "t", TAGS, ffmpeg=broken, overwrite=True)
    assert {p: p.read_bytes() for p in out.iterdir()} == before_bytes  # byte-identical, nothing added
    assert list(private_tmp.iterdir()) == []


def test_missing_ffmpeg_and_missing_encoder(tmp_path, monkeypatch, ffmpeg):
    monkeypatch.setenv("TYDUST_FFMPEG", str(tmp_path / "nope"))
    with pytest.raises(FfmpegError, match="does not run"):
        find_ffmpeg()
    script = tmp_path / "ffmpeg-novorbis"
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in *-encoders*) echo " A..... libmp3lame  MP3"; exit 0 ;; esac\n'
        f'exec "{ffmpeg.path}" "$@"\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("TYDUST_FFMPEG", str(script))
    found = find_ffmpeg()
    assert found.source == "TYDUST_FFMPEG"
    with pytest.raises(FfmpegError, match="lacks the libvorbis encoder"):
        check_encoders(found)


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputDirError, match="blocker/file/sub cannot be created: .*file is not a folder".replace("blocker/", "")):
        export.check_output_dir(blocker / "sub")
    export.check_output_dir(tmp_path / "new" / "deeper")
    assert not (tmp_path / "new").exists()  # checking creates nothing
    with pytest.raises(OutputDirError, match="not a folder"):
        export.check_output_dir(blocker)


# --- MP3 length: read where the format puts it, never found by searching the bytes ---


def syncsafe(n: int) -> bytes:
    return bytes((n >> shift) & 0x7F for shift in (21, 14, 7, 0))


def test_mp3_length_ignores_header_look_alikes_in_stacked_id3_tags(tmp_path, ffmpeg):
    """A tag before the real one (with a footer) holds "Info"/"Xing" headers that a byte search would take."""
    (f_mp3, _) = export.export_track(stereo(1.3), tmp_path, "t", TAGS, ffmpeg=ffmpeg)
    fake_header = b"Info" + (0x0F).to_bytes(4, "big") + (0xFFFFFF).to_bytes(4, "big") + bytes(108) + b"Lavc" + bytes(40)
    body = b"TXXX" + syncsafe(len(fake_header) + 1) + b"\x00\x00" + b"\x03" + fake_header + b"Xing" + bytes(64)
    stacked = b"ID3\x04\x00\x10" + syncsafe(len(body)) + body + b"3DI\x04\x00\x10" + syncsafe(len(body))
    path = tmp_path / "stacked.mp3"
    path.write_bytes(stacked + f_mp3.path.read_bytes())
    assert abs(mp3_gapless_duration(path, 44_100) - 1.3) < 0.001
    assert abs(inspect_file(path, "mp3").duration_s - 1.3) < 0.001


@pytest.mark.parametrize(
    ("rate", "channels", "bitrate"),
    [(44_100, 1, "64k"), (22_050, 2, "64k"), (22_050, 1, "32k"), (8_000, 2, "16k")],  # MPEG-1 mono, MPEG-2, MPEG-2.5
)
def test_mp3_length_in_every_frame_layout(tmp_path, ffmpeg, rate, channels, bitrate):
    """Side information is 32/17 bytes (MPEG-1 stereo/mono) or 17/9 (MPEG-2 and 2.5); 576 samples a frame past MPEG-1."""
    path = tmp_path / "t.mp3"
    cmd = [ffmpeg.path, "-v", "error", "-f", "lavfi", "-i", "sine=f=440:d=1.25", "-ar", str(rate), "-ac", str(channels),
           "-c:a", "libmp3lame", "-b:a", bitrate, str(path)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    assert abs(mp3_gapless_duration(path) - 1.25) < 0.001
    assert mp3_gapless_duration(path, 48_000) is None  # a caller that read another rate gets no answer


def test_mp3_whose_info_tag_has_no_frame_count_is_measured_by_decoding(tmp_path, ffmpeg):
    """An Info tag without a frame count (older encoders) gives no gapless length: the decoded samples do."""
    (f_mp3, _) = export.export_track(stereo(1.5), tmp_path, "t", TAGS, ffmpeg=ffmpeg)
    data = bytearray(f_mp3.path.read_bytes())
    start = 10 + sum(b << (7 * (3 - k)) for k, b in enumerate(data[6:10]))  # past the ID3v2 tag
    info = start + 4 + 32  # MPEG-1 stereo: header, side information
    assert data[info : info + 8] == b"Info\x00\x00\x00\x0f"  # frames, bytes, seek table, quality
    lame = data[info + 120 : info + 156]  # encoder string and LAME extension
    data[info : info + 156] = (b"Info" + bytes(4) + lame).ljust(156, b"\x00")  # flags: nothing
    path = tmp_path / "no-count.mp3"
    path.write_bytes(bytes(data))
    assert mp3_gapless_duration(path, 44_100) is None
    length = inspect_file(path, "mp3").duration_s
    assert length == decoded_duration(path)
    assert abs(length - 1.5) < 0.05
