"""The stages after generation: ffmpeg children at the same time, cleanup as before, no full-track copies.

The concurrency tests put a wrapper in front of the real ffmpeg that makes one
child wait for an event only another child can cause (a marker file), with a
bounded wait: if the children ran one after the other, the waiting one would
give up and the test would fail. No timing is asserted.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from synth import music

from tydust_gen.audio import master
from tydust_gen.base.errors import ExportError
from tydust_gen.base.waveform import Waveform
from tydust_gen.export import staging as export
from tydust_gen.export.ffmpeg import Ffmpeg, find_ffmpeg
from tydust_gen.export.loudness import encoded_true_peak, encoded_true_peaks
from tydust_gen.export.tags import TrackTags

TAGS = TrackTags(title="t", genre=None, comment="c")
WAIT_POLLS = 3000  # x 10 ms: how long a wrapper waits for the other child before giving up
GAVE_UP = 97  # the wrapper's exit status when the other child never started


def stereo(seconds: float) -> Waveform:
    t = torch.arange(round(seconds * 44_100)) / 44_100
    return Waveform((0.3 * torch.sin(2 * torch.pi * 220 * t)).expand(2, -1).contiguous(), 44_100)


def wrapper(tmp_path: Path, cases: str) -> Ffmpeg:
    """An ffmpeg that runs ``cases`` (sh ``case`` arms on its arguments) and then the real ffmpeg."""
    real = find_ffmpeg().path
    script = tmp_path / "ffmpeg"
    script.write_text(
        "#!/bin/sh\n"
        f'M="{tmp_path}"\n'
        f"wait_for() {{ i=0; while [ ! -e \"$M/$1\" ]; do i=$((i+1)); [ $i -gt {WAIT_POLLS} ] && exit {GAVE_UP}; sleep 0.01; done; }}\n"
        f'case "$*" in\n{cases}\nesac\n'
        f'exec "{real}" "$@"\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return Ffmpeg(str(script), "test", "wrapper")


def test_mp3_and_ogg_encode_at_the_same_time(tmp_path):
    """The MP3's ffmpeg does not start encoding until the OGG's has started."""
    ff = wrapper(tmp_path, '*libvorbis*) touch "$M/ogg.started" ;;\n*libmp3lame*) wait_for ogg.started ;;')
    out = tmp_path / "out"
    files = export.export_track(stereo(1.0), out, "t", TAGS, ffmpeg=ff)
    assert [f.path.name for f in files] == ["t.mp3", "t.ogg"]
    assert sorted(p.name for p in out.iterdir()) == ["t.mp3", "t.ogg"]


def test_failed_mp3_kills_the_ogg_still_encoding(tmp_path):
    """The OGG's ffmpeg is running (and would run on) when the MP3's fails: the error names the MP3, the OGG's
    ffmpeg is killed, and the staging folder is gone when the call returns."""
    ff = wrapper(
        tmp_path,
        '*libvorbis*) echo $$ > "$M/ogg.pid"; wait_for never ;;\n'
        '*libmp3lame*) wait_for ogg.pid; echo "Unknown encoder libmp3lame" >&2; exit 1 ;;',
    )
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"ffmpeg failed to encode t\.mp3"):
        export.export_track(stereo(1.0), out, "t", TAGS, ffmpeg=ff)
    pid = int((tmp_path / "ogg.pid").read_text())
    stat_file = Path(f"/proc/{pid}/stat")
    assert not stat_file.exists() or stat_file.read_text().split()[2] == "Z"
    assert list(out.iterdir()) == []


def test_encoded_files_are_measured_at_the_same_time(tmp_path, monkeypatch):
    """Each file is decoded by its own ffmpeg, both running at once; the peaks are those measured one by one."""
    ff = find_ffmpeg()
    paths = export.export_track(stereo(1.0), tmp_path / "files", "t", TAGS, ffmpeg=ff)
    alone = [encoded_true_peak(f.path) for f in paths]
    script = wrapper(
        tmp_path,
        '*t.ogg*f32le*) touch "$M/ogg.decoding" ;;\n'
        '*t.mp3*f32le*) wait_for ogg.decoding ;;',
    )
    monkeypatch.setenv("TYDUST_FFMPEG", script.path)
    together = encoded_true_peaks([f.path for f in paths])
    assert list(together) == alone
    assert np.all(np.isfinite(together))


def test_one_file_is_measured_without_threads(tmp_path):
    ff = find_ffmpeg()
    path = export.export_track(stereo(0.5), tmp_path, "t", TAGS, ffmpeg=ff)[1].path
    assert encoded_true_peaks([path]) == (encoded_true_peak(path),)
    assert encoded_true_peaks([]) == ()
    assert os.path.exists(path)


def whole_track_envelope(audio: np.ndarray, circular: bool) -> np.ndarray:
    """The true-peak envelope by scipy's own polyphase resampler, in one piece per channel: an independent
    implementation of the interpolation the blocked torch scan runs."""
    from scipy.signal import resample_poly

    pad, n = 16, audio.shape[1]
    env = np.max(np.abs(audio), axis=0)
    for channel in np.pad(audio, ((0, 0), (pad, pad)), mode="wrap" if circular else "constant"):
        up = np.abs(resample_poly(channel, 4, 1).astype(np.float32)[pad * 4 : (pad + n) * 4])
        for phase in range(4):
            np.maximum(env, up[phase::4], out=env)
    return env


@pytest.mark.parametrize("seconds", [0.0001, 0.01, 1.486, 4.0])  # 4 samples, one block, a block and one sample, several
@pytest.mark.parametrize("circular", [False, True])
def test_blocked_peak_scan_is_scipys_whole_track_resampling(seconds, circular):
    """The same envelope as scipy's resample_poly on the whole track, to float32 rounding, at every sample:
    block edges, the loop seam (circular) and the track's ends included."""
    audio = music(seconds, seed=4, level=0.5) if seconds >= 0.01 else np.array([[0.5, -0.3, 0.9, 0.1]] * 2, np.float32)
    got, want = master.peak_envelope(audio, circular=circular), whole_track_envelope(audio, circular)
    assert got.shape == want.shape == (audio.shape[1],)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
    assert np.all(got >= np.max(np.abs(audio), axis=0))  # the samples themselves count


PEAK_SCAN_MEMORY = """
import resource, sys
import numpy as np
from tydust_gen.audio import master
master.peak_envelope(np.zeros((2, 1000), np.float32))  # imports and torch's own start-up memory
audio = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 180 * 44_100)).astype(np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
master.peak_envelope(audio)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 / audio.nbytes)
"""


def test_peak_scan_makes_no_oversampled_copy_of_the_track():
    """The scan's working memory is the track's copies and a few blocks, not 4 bytes x 4 x N per channel: the
    peak RSS of a child process scanning 180 s of stereo grows by under 4x the audio's size (a whole-track
    4x oversampled scan needs at least 8x: the oversampled signal and its magnitude). RSS, not tracemalloc,
    because torch allocates outside Python's allocator."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", PEAK_SCAN_MEMORY], capture_output=True, text=True, check=True)
    growth = float(proc.stdout.strip().splitlines()[-1])
    assert growth < 4.0, f"{growth:.1f}x the audio"


def test_static_gain_reports_the_peak_it_produces():
    """The output true peak of a static gain is computed, not measured again; it is the measured one."""
    audio = master.remove_dc(music(6.0, seed=5, level=0.05), 44_100)
    result = master.master(audio, 44_100, target_lufs=-20.0, ceiling_dbtp=-1.0)
    assert result.limiter_max_reduction_db == 0.0 and result.gain_db != 0.0
    assert math.isclose(result.output_true_peak_dbtp, master.true_peak(result.samples), abs_tol=1e-4)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads niceness from /proc (Linux)")
def test_a_finished_file_is_measured_at_a_lower_priority(tmp_path, monkeypatch):
    """measure_file runs in an encoding thread while the other format may still encode: that thread and
    its decoder yield the CPU (nice +10); the peak is the one measured at normal priority."""
    import threading

    from tydust_gen.base.processes import BACKGROUND_NICE
    from tydust_gen.export.loudness import measure_file

    path = export.export_track(stereo(0.5), tmp_path / "files", "t", TAGS, ffmpeg=find_ffmpeg())[0].path
    want = encoded_true_peak(path)
    script = wrapper(tmp_path, "*f32le*) awk '{print $19}' /proc/$$/stat > \"$M/decoder.nice\" ;;")
    monkeypatch.setenv("TYDUST_FFMPEG", script.path)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    seen = {}

    def measure():
        seen["result"] = measure_file(path)
        seen["thread"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    worker = threading.Thread(target=measure)
    worker.start()
    worker.join()
    assert seen["result"].path == path and seen["result"].true_peak_dbtp == want
    assert seen["thread"] == min(base + BACKGROUND_NICE, 19)
    assert int((tmp_path / "decoder.nice").read_text()) == min(base + BACKGROUND_NICE, 19)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the calling process's own thread is untouched



def _follower_children() -> list[int]:
    """Our own live children that are followers' decoders (ffmpeg reading its stdin); a zombie's command
    line is empty, so only live ones are found (a killed decoder is awaited by the follower itself)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == os.getpid() and b"pipe:0" in cmd:
            found.append(int(entry.name))
    return found


def _follower_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("tydust-follow")]


def _staged_encode(tmp_path: Path, seconds: float, *, circular: bool, ffmpeg: Ffmpeg | None = None, seed: int = 3):
    from tydust_gen.export.loudness import EncodedPeaks

    x = master.master(master.remove_dc(music(seconds, seed=seed, dc=0.2), 44_100), 44_100, circular=circular).samples
    peaks = EncodedPeaks(circular=circular)
    with export.Staging(tmp_path / "out", "t", ffmpeg=ffmpeg or find_ffmpeg()) as staging:
        measured = staging.encode(Waveform(torch.from_numpy(x), 44_100), TAGS, then=peaks.measure, watch=peaks.watch)
        # the staged, tagged files, measured afterwards as before: the reference
        after = [encoded_true_peak(m.path, circular=circular) for m in measured]
    return measured, after


@pytest.mark.skipif(os.name != "posix" or not Path("/proc/self/stat").exists(),
                    reason="followed only where an open file can be deleted (POSIX); children are read from /proc")
@pytest.mark.parametrize("circular", [False, True])
def test_the_ogg_measured_while_encoding_is_the_finished_files_peak(tmp_path, circular):
    """Through the real encoders: the OGG is measured from the bytes as libvorbis writes them, the MP3 once
    written; each peak is exactly that of the finished, tagged file decoded afterwards."""
    measured, after = _staged_encode(tmp_path, 8.0, circular=circular)
    assert [m.path.suffix for m in measured] == [".mp3", ".ogg"]
    assert [m.while_written for m in measured] == [False, True]
    assert [m.true_peak_dbtp for m in measured] == after
    assert all(math.isfinite(p) for p in after)
    assert _follower_threads() == [] and _follower_children() == []


@pytest.mark.skipif(os.name != "posix" or not Path("/proc/self/stat").exists(),
                    reason="followed only where an open file can be deleted (POSIX); children are read from /proc")
def test_a_follower_decodes_a_file_before_its_writer_has_finished(tmp_path):
    """The file grows in two steps and the second waits until the follower has decoded audio from the first:
    so it measured while the file was incomplete, and its peak is still the whole file's."""
    import subprocess
    import sys

    from tydust_gen.export.loudness import _Follower

    from synth import encode

    done = encode(music(6.0, seed=5), 44_100, tmp_path / "done.ogg")
    data = done.read_bytes()
    growing = tmp_path / "growing.ogg"
    growing.write_bytes(b"")
    writer = subprocess.Popen([sys.executable, "-c", "pass", str(growing)])  # its last argument names the file
    follower = _Follower("ogg", circular=False)
    follower.start(writer)
    with open(growing, "ab") as f:
        f.write(data[: len(data) * 2 // 3])
        f.flush()
        assert follower.first_audio.wait(60)  # decoded from two thirds of the file
        f.write(data[len(data) * 2 // 3 :])
    follower.written(growing)
    writer.wait()
    assert follower.peak() == encoded_true_peak(done)
    assert _follower_threads() == [] and _follower_children() == []


@pytest.mark.skipif(os.name != "posix" or not Path("/proc/self/stat").exists(),
                    reason="followed only where an open file can be deleted (POSIX); children are read from /proc")
def test_a_follower_whose_bytes_differ_from_the_file_gives_no_peak(tmp_path):
    import subprocess
    import sys

    from synth import encode

    from tydust_gen.export.loudness import _Follower

    path = encode(music(3.0, seed=6), 44_100, tmp_path / "a.ogg")
    writer = subprocess.Popen([sys.executable, "-c", "pass", str(path)])
    follower = _Follower("ogg", circular=False)
    follower.start(writer)
    assert follower.first_audio.wait(60)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # the file as it ends up is not what was followed
    final = tmp_path / "final.ogg"
    final.write_bytes(bytes(data))
    follower.written(final)
    writer.wait()
    assert follower.peak() is None
    assert _follower_threads() == [] and _follower_children() == []


@pytest.mark.skipif(os.name != "posix" or not Path("/proc/self/stat").exists(),
                    reason="followed only where an open file can be deleted (POSIX); children are read from /proc")
def test_a_failing_follower_falls_back_to_measuring_the_finished_file(tmp_path, monkeypatch):
    """The follower's decoder fails (an ffmpeg that refuses to read its stdin): the OGG is measured after it
    is written instead, with the same result, and nothing of the follower is left."""
    ff = wrapper(tmp_path, '*pipe:0*) echo "no pipes here" >&2; exit 1 ;;')
    monkeypatch.setenv("TYDUST_FFMPEG", ff.path)
    measured, after = _staged_encode(tmp_path, 3.0, circular=False, ffmpeg=ff)
    assert [m.while_written for m in measured] == [False, False]
    assert [m.true_peak_dbtp for m in measured] == after
    assert _follower_threads() == [] and _follower_children() == []


@pytest.mark.skipif(os.name != "posix" or not Path("/proc/self/stat").exists(),
                    reason="followed only where an open file can be deleted (POSIX); children are read from /proc")
def test_an_ogg_that_fails_to_write_leaves_no_follower_behind(tmp_path, monkeypatch):
    """A full disk as the OGG is written: the error, the staging folder gone, the follower's decoder killed
    and its threads ended before the call returns."""
    from tydust_gen.base.faults import FAULT_ENV

    monkeypatch.setenv(FAULT_ENV, "enospc:ogg")
    with pytest.raises(ExportError, match=r"t\.ogg"):
        _staged_encode(tmp_path, 3.0, circular=False)
    assert list((tmp_path / "out").iterdir()) == []
    assert _follower_threads() == [] and _follower_children() == []


@pytest.mark.skipif(os.name != "posix" or not Path("/proc/self/stat").exists(),
                    reason="followed only where an open file can be deleted (POSIX); children are read from /proc")
def test_a_follower_starting_late_still_reads_a_file_deleted_meanwhile(tmp_path, monkeypatch):
    """On a busy machine the follower's background-priority threads may start after the encoder is done and
    pydub has copied and deleted its output: the file is opened as the encoder starts, so it is still read."""
    import shutil
    import subprocess
    import sys
    import threading

    from synth import encode

    from tydust_gen.export import loudness
    from tydust_gen.export.loudness import _Follower

    go = threading.Event()
    real = loudness.processes.run_in_background
    monkeypatch.setattr(loudness.processes, "run_in_background", lambda: (go.wait(60), real()))  # a starved thread
    output = encode(music(3.0, seed=7), 44_100, tmp_path / "pydub-temp.ogg")
    writer = subprocess.Popen([sys.executable, "-c", "pass", str(output)])
    follower = _Follower("ogg", circular=False)
    follower.start(writer)
    final = shutil.copy(output, tmp_path / "t.ogg")  # pydub copies its output, then deletes it
    output.unlink()
    go.set()
    follower.written(Path(final))
    writer.wait()
    assert follower.peak() == encoded_true_peak(final)
    assert _follower_threads() == [] and _follower_children() == []
