"""The low-frequency response of everything after the model, measured on the encoded files.

Known tones at the model's rate (32 kHz) go through the pipeline's own stages
(``prepare_take_audio``: 44.1 kHz stereo, DC removal, loop folding; ``master_take``:
mastering checked on real MP3/OGG encodes through the staging folder), and their levels are
read back from the files decoded by ffmpeg with a plain numpy FFT, relative to a 1 kHz tone.

The DC high-pass is a 2nd-order Butterworth at 20 Hz run forward and backward:
|H|^2 per pass = r^4 / (1 + r^4) with r = f / 20 Hz, so the pair loses 10 log10(1 + r^-4) dB:
6.02 dB at 20 Hz, 0.53 at 40 Hz, 0.11 at 60 Hz. Run twice (it once was, in the pipeline and again
in ``master``), every figure doubles: 12.0 / 1.05 / 0.21 dB.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from tydust_gen.audio.loop import DEFAULT_LOOP_OVERRUN_S
from tydust_gen.base.settings import MasteringSettings
from tydust_gen.base.waveform import Waveform
from tydust_gen.export.ffmpeg import find_ffmpeg
from tydust_gen.export.staging import Staging
from tydust_gen.export.tags import TrackTags
from tydust_gen.runs.pipeline import master_take, prepare_take_audio

MODEL_RATE = 32_000  # Hz, MusicGen's EnCodec
OUT_RATE = 44_100  # Hz
SECONDS = 6.0  # s; whole periods of every tone, long enough for a 4 s steady-state window
REFERENCE_HZ = 1000.0
TONE_AMPLITUDE = 0.1  # each tone at -20 dBFS: the sum stays under the -1 dBTP ceiling, so no gain, no limiter
DC_OFFSET = 0.3  # like the tiny model's output (FACTS.md), removed on the way
# Steady state only: 1 s in (the filters' edge transients last ~50 ms), exactly 4 s long so every tone
# sits on an FFT bin (0.25 Hz spacing at 44.1 kHz).
WINDOW_START_S = 1.0
WINDOW_S = 4.0

# (Hz, expected level relative to 1 kHz in dB, tolerance dB): the response audio/master.py documents.
EXPECTED = [(20.0, -6.0, 0.5), (40.0, -0.5, 0.3), (60.0, -0.1, 0.2)]
TONES_HZ = [f for f, _, _ in EXPECTED] + [REFERENCE_HZ]


def decode(path) -> np.ndarray:
    """ffmpeg → float32 ``[2, N]`` at 44.1 kHz, without the code under test's decoder."""
    proc = subprocess.run(
        [find_ffmpeg().path, "-nostdin", "-v", "error", "-i", str(path), "-f", "f32le", "-ac", "2", "-ar", str(OUT_RATE), "-"],
        capture_output=True, check=True,
    )  # fmt: skip
    return np.frombuffer(proc.stdout, dtype="<f4").reshape(-1, 2).T


def tone_levels_db(x: np.ndarray, freqs: list[float]) -> dict[float, float]:
    """Level of each tone (left channel), dB, from a Hann-windowed FFT of the steady-state window."""
    start = int(WINDOW_START_S * OUT_RATE)
    n = int(WINDOW_S * OUT_RATE)
    seg = x[0, start : start + n].astype(np.float64)
    assert seg.size == n, f"decoded audio is too short: {x.shape[1]} samples"
    spectrum = np.abs(np.fft.rfft(seg * np.hanning(n)))
    return {f: 20 * np.log10(spectrum[int(round(f * WINDOW_S))]) for f in freqs}


@pytest.fixture(scope="module", params=["plain", "loop"])
def decoded_takes(request, tmp_path_factory) -> dict[str, np.ndarray]:
    """The tones through the pipeline's stages after the model, as the MP3 and OGG decode them."""
    loop = request.param == "loop"
    # in loop mode the pipeline generates an overrun and folds it into a loop of the track's length
    generated = SECONDS + (DEFAULT_LOOP_OVERRUN_S if loop else 0.0)
    t = np.arange(int(round(generated * MODEL_RATE))) / MODEL_RATE
    mono = DC_OFFSET + TONE_AMPLITUDE * sum(np.sin(2 * np.pi * f * t) for f in TONES_HZ)
    wave = Waveform(torch.from_numpy(mono[np.newaxis, :].astype(np.float32)), MODEL_RATE)
    # loudness off: the static gain is 0 dB and the tones keep their relative levels
    mastering = MasteringSettings(loudness_lufs=None, true_peak_dbtp=-1.0, loop=loop)
    prepared = prepare_take_audio(wave, generated_s=generated, duration_s=SECONDS, mastering=mastering)
    with Staging(tmp_path_factory.mktemp("response"), "tones", ffmpeg=find_ffmpeg()) as staging:
        tags = TrackTags(title="tones", genre=None, comment="")

        def encode(result):
            return staging.encode(Waveform(torch.from_numpy(np.ascontiguousarray(result.samples)), prepared.sample_rate), tags)

        mastered = master_take(prepared, mastering, encode)
        assert mastered.master.gain_db == 0.0 and mastered.master.limiter_max_reduction_db == 0.0
        return {p.suffix.lstrip("."): decode(p) for p in mastered.paths}


@pytest.mark.parametrize("fmt", ["mp3", "ogg"])
def test_low_frequency_response_of_the_whole_chain(decoded_takes, fmt):
    x = decoded_takes[fmt]
    assert abs(float(x.mean())) < 1e-3  # the offset is gone
    levels = tone_levels_db(x, TONES_HZ)
    measured = {f: round(levels[f] - levels[REFERENCE_HZ], 2) for f, _, _ in EXPECTED}
    for freq, expected_db, tolerance_db in EXPECTED:
        assert measured[freq] == pytest.approx(expected_db, abs=tolerance_db), (fmt, measured)


def test_the_libraries_after_the_model_are_imported_in_the_background():
    """A fresh interpreter: import_in_background loads the modules in a daemon thread (a name that fails is
    skipped quietly and the rest still load), so the stages after the model do not pay scipy.signal's import."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tydust_gen.runs.pipeline import AFTER_MODEL_MODULES, import_in_background\n"
        "assert 'scipy.signal' not in sys.modules\n"
        "t = import_in_background(AFTER_MODEL_MODULES)\n"
        "assert t.daemon\n"
        "t.join()\n"
        "assert all(m in sys.modules for m in AFTER_MODEL_MODULES), AFTER_MODEL_MODULES\n"
        "assert 'wave' not in sys.modules\n"
        "import_in_background(['no_such_module_here', 'wave']).join()\n"
        "assert 'wave' in sys.modules\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_a_run_starts_the_background_imports_once_the_model_is_loaded_and_before_generation(workdir, run_cli, monkeypatch):
    """The real command: the imports start once per track, in render_takes (the model is loaded by then), and
    before the first generation step."""
    from tydust_gen.model import generate
    from tydust_gen.runs import pipeline

    events: list[str] = []
    start = pipeline.import_in_background
    real_generate = generate.generate_codes

    def started(modules):
        events.append(f"imports {','.join(modules)}")
        return start(modules)

    def generating(loaded, *args, **kwargs):
        events.append(f"generate with {type(loaded).__name__}")
        return real_generate(loaded, *args, **kwargs)

    monkeypatch.setattr(pipeline, "import_in_background", started)
    monkeypatch.setattr(generate, "generate_codes", generating)
    result = run_cli("game_over", "-d", "0.4", "-o", "out", "--backend", "stock")
    assert result.exit_code == 0, result.stderr
    assert events == [f"imports {','.join(pipeline.AFTER_MODEL_MODULES)}", "generate with LoadedModel"]
