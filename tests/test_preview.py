"""Preview PNG: exists, is a real PNG of the promised size, written atomically."""

from __future__ import annotations

import struct

import pytest
from synth import SR, music

pytest.importorskip("matplotlib")

from tydust_gen.audio.preview import render_preview  # noqa: E402


def test_preview_png(tmp_path, encoded_loop):
    path = tmp_path / "loop.png"
    out = render_preview(encoded_loop.loop.samples, SR, path, "loop — test", loop_seam=encoded_loop.loop.loop_length)
    data = out.read_bytes()
    assert out == path and len(data) > 20_000
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1200, 600)
    assert [p.name for p in tmp_path.iterdir()] == ["loop.png"]  # no temporary left behind


def test_preview_mono_without_seam(tmp_path):
    path = render_preview(music(2.0)[:1], SR, tmp_path / "mono.png")
    assert path.stat().st_size > 10_000


def test_preview_rejects_bad_seam(tmp_path):
    with pytest.raises(ValueError):
        render_preview(music(1.0), SR, tmp_path / "x.png", loop_seam=10 * SR)
    assert not (tmp_path / "x.png").exists()
