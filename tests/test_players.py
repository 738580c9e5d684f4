"""A game engine's mixer (pygame / SDL_mixer) loads the OGG and the MP3."""

from __future__ import annotations

import os

import numpy as np
import pytest

pygame = pytest.importorskip("pygame")


@pytest.fixture()
def mixer(monkeypatch):
    monkeypatch.setenv("SDL_AUDIODRIVER", "dummy")
    pygame.mixer.init(44100)
    try:
        yield pygame.mixer
    finally:
        pygame.mixer.quit()


def mixer_samples(sound) -> np.ndarray:
    """What the game would play: the mixer's decoded PCM as float ``[2, N]`` (full scale 1.0)."""
    return np.frombuffer(sound.get_raw(), dtype=np.int16).reshape(-1, 2).T / 32768.0


def error_db(actual: np.ndarray, expected: np.ndarray) -> float:
    """Level of ``actual - expected`` relative to ``expected``, dB."""
    return float(20 * np.log10(np.sqrt(np.mean((actual - expected) ** 2)) / np.sqrt(np.mean(expected**2))))


# A 192k MP3 decodes to within about -26 dB of its source, an OGG q6 to about -31 dB (measured
# here); the fixture's left and right differ by about -8 dB, so a file decoded into the wrong
# channel, as mono, shifted or at the wrong rate lands far above this bound.
MATCH_DB = -20.0


@pytest.mark.parametrize("fmt", ["ogg", "mp3"])
def test_pygame_plays_what_was_encoded(mixer, encoded_loop, fmt):
    assert mixer.get_init() == (44100, -16, 2)  # the rate, sample format and channels a game opens
    expected = encoded_loop.encoded.master.samples
    sound = mixer.Sound(os.fspath(getattr(encoded_loop, fmt)))
    played = mixer_samples(sound)
    # sample-exact: SDL_mixer honours the encoder delay and padding (LAME's gapless header for MP3)
    assert played.shape == expected.shape == (2, encoded_loop.loop.loop_length)
    assert sound.get_length() == pytest.approx(encoded_loop.loop.loop_length / 44100, abs=1e-3)
    for ch in (0, 1):
        assert error_db(played[ch], expected[ch]) < MATCH_DB, (fmt, ch)
        assert error_db(played[ch], expected[1 - ch]) > MATCH_DB + 6, (fmt, ch)  # stereo, not swapped
    mixer.music.load(os.fspath(getattr(encoded_loop, fmt)))
    mixer.music.play()
    assert mixer.music.get_busy()
    mixer.music.stop()


def test_pygame_loads_the_cli_outputs(mixer, workdir, run_cli):
    """The files tydust-gen itself writes (pydub export, tags, loop comments) load in SDL_mixer."""
    from tydust_gen.export.loudness import decode_audio

    result = run_cli("menu_calm", "-d", "2", "--loop", "-o", "out")
    assert result.exit_code == 0, result.stderr
    for fmt in ("ogg", "mp3"):
        path = workdir / f"out/menu_calm.{fmt}"
        sound = mixer.Sound(os.fspath(path))
        played = mixer_samples(sound)
        assert played.shape == (2, 2 * 44100), fmt  # the loop length, to the sample
        # the same audio ffmpeg decodes from the file (16-bit output: a few LSB of rounding)
        assert error_db(played, decode_audio(path)) < -60.0, fmt
        mixer.music.load(os.fspath(path))
        mixer.music.play()
        assert mixer.music.get_busy()
        mixer.music.stop()
