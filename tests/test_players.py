"""A game engine's mixer (pygame / SDL_mixer) loads the OGG and the MP3."""

from __future__ import annotations

import os

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


def test_pygame_loads_ogg_and_mp3(mixer, encoded_loop):
    sound = mixer.Sound(os.fspath(encoded_loop.ogg))
    assert sound.get_length() == pytest.approx(encoded_loop.loop.loop_length / 44100, abs=0.05)
    mixer.music.load(os.fspath(encoded_loop.mp3))
    mixer.music.play()
    mixer.music.stop()


def test_pygame_loads_the_cli_outputs(mixer, workdir, run_cli):
    """The files tydust-gen itself writes (pydub export, tags, loop comments) load in SDL_mixer."""
    result = run_cli("menu_calm", "-d", "2", "--loop", "-o", "out")
    assert result.exit_code == 0, result.stderr
    sound = mixer.Sound(os.fspath(workdir / "out/menu_calm.ogg"))
    assert sound.get_length() == pytest.approx(2.0, abs=0.05)
    mixer.music.load(os.fspath(workdir / "out/menu_calm.mp3"))
    mixer.music.play()
    mixer.music.stop()
