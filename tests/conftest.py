"""Shared fixtures: a tiny random MusicGen saved in the real layout, prompt folders, a CLI runner.

No network and no real weights: ``HF_HUB_OFFLINE=1`` and an empty ``HF_HOME`` are
set for every test so nothing can reach (or silently use) a hub cache.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# One OpenMP thread per test process (and the CLI processes tests start, which inherit it): the tiny
# model's operations are too small to gain from a second thread, and on a 2-core machine that is also
# running other work (CI runs the Ray tests beside the rest) two spinning OpenMP threads made the suite
# 2-3x slower. Set before torch is imported; a test that needs torch's worker threads asks for them.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from synth import SR, encode, music

from tydust_gen.audio.loop import LoopResult, make_loop
from tydust_gen.audio.master import remove_dc
from tydust_gen.cli import app
from tydust_gen.export.loudness import EncodedMasterResult, master_for_encoding
from tydust_gen.export.tags import write_loop_tags
from tydust_gen.model.tiny import save_tiny_model


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch, tmp_path_factory):
    home = tmp_path_factory.getbasetemp() / "hf_home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the CPU kernel is built once per test session (here), never into the user's cache
    monkeypatch.setenv("TYDUST_KERNEL_CACHE", str(tmp_path_factory.getbasetemp() / "kernels"))
    monkeypatch.setenv("TYDUST_CACHE", str(tmp_path_factory.getbasetemp() / "tydust-cache"))  # model file hashes
    monkeypatch.delenv("TYDUST_CPU_KERNEL", raising=False)
    monkeypatch.delenv("TYDUST_FFMPEG", raising=False)
    monkeypatch.delenv("TYDUST_MODEL", raising=False)
    monkeypatch.delenv("TYDUST_PROMPTS_DIR", raising=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random MusicGen saved with save_pretrained, loaded by tests through --model DIR."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-musicgen"))


@pytest.fixture(scope="session")
def tiny_stereo_dir(tmp_path_factory) -> Path:
    """A tiny random stereo MusicGen (8 interleaved codebooks, as musicgen-stereo-small) saved with save_pretrained."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-musicgen-stereo"), stereo=True)


@pytest.fixture(scope="session")
def tiny_stereo(tiny_stereo_dir):
    """The tiny stereo model loaded through the same code path the CLI uses."""
    import torch

    from tydust_gen.model import loading as engine

    return engine.load_model(engine.resolve_source(str(tiny_stereo_dir)), torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_melody_dir(tmp_path_factory) -> Path:
    """A tiny random MusicgenMelody (chroma + text prepended to the decoder input, as facebook/musicgen-melody)
    saved with save_pretrained, with its MusicgenMelodyProcessor."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-musicgen-melody"), melody=True)


#: The commit the HF-cache copy of the tiny melody model pretends to be.
MELODY_CACHE_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(scope="session")
def melody_hf_home(tmp_path_factory, tiny_melody_dir) -> Path:
    """An HF_HOME whose hub cache holds the tiny melody model as facebook/musicgen-melody (snapshot + refs/main)."""
    home = tmp_path_factory.mktemp("hf-melody")
    repo = home / "hub" / "models--facebook--musicgen-melody"
    shutil.copytree(tiny_melody_dir, repo / "snapshots" / MELODY_CACHE_COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(MELODY_CACHE_COMMIT)
    return home


@pytest.fixture(scope="session")
def tiny_melody(tiny_melody_dir):
    """The tiny melody model loaded through the same code path the CLI uses."""
    import torch

    from tydust_gen.model import loading as engine

    return engine.load_model(engine.resolve_source(str(tiny_melody_dir)), torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    """The tiny model loaded once through the same code path the CLI uses."""
    import torch

    from tydust_gen.model import loading as engine

    return engine.load_model(engine.resolve_source(str(tiny_model_dir)), torch.device("cpu"))


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model is loaded: refusals and errors must come before that."""
    from tydust_gen.model import loading

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the error was detected")

    monkeypatch.setattr(loading, "load_model", boom)


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A project folder with the shipped prompts, used as the working directory."""
    shutil.copytree(REPO / "prompts", tmp_path / "prompts")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def run_cli(tiny_model_dir):
    """Run the real CLI in-process; ``--model`` defaults to the tiny model unless given."""
    runner = CliRunner()

    def run(*args: str, model: bool = True, env: dict | None = None):
        argv = list(args)
        if model and "--model" not in argv and argv and argv[0] not in ("--help", "--version"):
            argv += ["--model", str(tiny_model_dir)]
        return runner.invoke(app, argv, env=env, catch_exceptions=False)

    return run


def files_under(root: Path) -> list[str]:
    """Every file below ``root`` (relative, sorted), hidden ones included."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """A fresh, empty system temp folder for this test, so leaks (pydub's go there) can be seen."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


# --- mastering fixtures (synthetic music, no model) ---

LOOP_S = 10.0  # s; 5.125 bars at 123 bpm, so a hard cut clicks
OVERRUN_S = 3.0  # s


@dataclass
class EncodedLoop:
    raw: np.ndarray  # [2, M] DC-removed source with overrun
    loop: LoopResult
    encoded: EncodedMasterResult
    mp3: Path
    ogg: Path


@pytest.fixture(scope="session")
def encoded_loop(tmp_path_factory: pytest.TempPathFactory) -> EncodedLoop:
    out = tmp_path_factory.mktemp("encoded")
    # hot enough that -14 LUFS needs the limiter
    raw = remove_dc(music(LOOP_S + OVERRUN_S, seed=3, dc=0.3, level=0.2), SR)
    loop = make_loop(raw, SR, int(LOOP_S * SR))
    mp3, ogg = out / "loop.mp3", out / "loop.ogg"

    def encode_both(result):
        return [encode(result.samples, SR, mp3), encode(result.samples, SR, ogg)]

    encoded = master_for_encoding(loop.samples, SR, encode_both, target_lufs=-14.0, ceiling_dbtp=-1.0, circular=True)
    write_loop_tags(ogg, loop.loop_start, loop.loop_length)
    return EncodedLoop(raw=raw, loop=loop, encoded=encoded, mp3=mp3, ogg=ogg)
