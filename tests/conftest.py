"""Shared fixtures: one mastered, looped and encoded synthetic track per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from synth import SR, encode, music

from tydust_gen.loop import LoopResult, make_loop, write_loop_tags
from tydust_gen.master import EncodedMasterResult, master_for_encoding, remove_dc

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
