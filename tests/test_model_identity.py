"""Model identity: which weights made a take, by content, fast on re-runs.

A local folder is identified by the sha256 of every file's bytes (cached by path,
size and mtime), a Hugging Face cache snapshot by its blobs' content addresses, so
a fine-tune saved with the same file names and shapes is another model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from tydust_gen.model.loading import resolve_source
from tydust_gen.model.tiny import save_tiny_model
from tydust_gen.runs import provenance


@pytest.fixture
def hash_cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "tydust-cache"
    monkeypatch.setenv(provenance.CACHE_ENV, str(folder))
    return folder


@pytest.fixture
def reads(monkeypatch) -> list[Path]:
    """Every file whose bytes the identity code reads, in order."""
    seen: list[Path] = []
    real = provenance._content_sha256

    def counting(path):
        seen.append(Path(path))
        return real(path)

    monkeypatch.setattr(provenance, "_content_sha256", counting)
    return seen


@pytest.fixture(scope="module")
def twin_models(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny models with the same files and shapes, different weights (another seed)."""
    root = tmp_path_factory.mktemp("twins")
    return save_tiny_model(root / "a", seed=0), save_tiny_model(root / "b", seed=1)


def sizes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def identity(folder: Path) -> dict:
    return provenance.model_identity(resolve_source(str(folder)))


def test_same_shapes_other_weights_is_another_model(twin_models, hash_cache):
    a, b = twin_models
    assert sizes(a) == sizes(b)  # what the old name + size hash saw: nothing to tell them apart
    ida, idb = identity(a), identity(b)
    assert ida["dir_sha256"] != idb["dir_sha256"]
    assert not provenance.same_model(ida, idb)
    assert provenance.same_model(ida, identity(a))


def test_skip_existing_rerenders_a_take_of_another_model(workdir, run_cli, twin_models, hash_cache):
    a, b = twin_models
    made = run_cli("game_over", "-d", "0.4", "-o", "out", "--seed", "2", "--model", str(a))
    assert made.exit_code == 0, made.stderr
    same = run_cli("game_over", "-d", "0.4", "-o", "out", "--seed", "2", "--model", str(a), "--skip-existing", "--json")
    assert same.exit_code == 0 and json.loads(same.stdout)["tracks"][0]["status"] == "skipped"
    refused = run_cli("game_over", "-d", "0.4", "-o", "out", "--seed", "2", "--model", str(b), "--skip-existing")
    assert refused.exit_code == 2
    assert "exists but is not current (made with another model)" in refused.stderr
    redone = run_cli("game_over", "-d", "0.4", "-o", "out", "--seed", "2", "--model", str(b),
                     "--skip-existing", "--force", "--json")  # fmt: skip
    assert redone.exit_code == 0, redone.stderr
    assert json.loads(redone.stdout)["tracks"][0]["status"] == "ok"
    record = json.loads((workdir / "out/game_over.json").read_text())
    assert record["model"]["dir_sha256"] == identity(b)["dir_sha256"]


def test_cache_is_used_and_a_touch_keeps_the_identity(tmp_path, hash_cache, reads):
    model = save_tiny_model(tmp_path / "m")
    files = sorted(p for p in model.rglob("*") if p.is_file())
    first = identity(model)
    assert sorted(reads) == files  # every file read once
    assert (hash_cache / provenance.HASH_CACHE_NAME).is_file()
    reads.clear()
    assert identity(model) == first and reads == []  # nothing read again
    weights = model / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # touched, same bytes
    assert identity(model) == first and reads == [weights]
    reads.clear()
    # new bytes of the same size (a fine-tune saved over it): read again, another identity
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 9_000_000_000))
    assert identity(model)["dir_sha256"] != first["dir_sha256"] and reads == [weights]


def test_a_broken_cache_file_costs_speed_only(tmp_path, hash_cache, reads):
    model = save_tiny_model(tmp_path / "m")
    first = identity(model)
    (hash_cache / provenance.HASH_CACHE_NAME).write_text("{ not json")
    reads.clear()
    assert identity(model) == first and len(reads) > 0
    reads.clear()
    assert identity(model) == first and reads == []  # rewritten whole, used again


def test_two_runs_merge_their_entries(twin_models, hash_cache, reads):
    """Two processes hashing different models both keep their entries (merged under the lock)."""
    a, b = twin_models
    one = provenance._HashCache(hash_cache / provenance.HASH_CACHE_NAME)
    two = provenance._HashCache(hash_cache / provenance.HASH_CACHE_NAME)  # read before `one` saved
    for p in a.rglob("*"):
        if p.is_file():
            one.sha256(p)
    for p in b.rglob("*"):
        if p.is_file():
            two.sha256(p)
    one.save()
    two.save()
    reads.clear()
    identity(a), identity(b)
    assert reads == []
    assert [p.name for p in hash_cache.iterdir() if not p.name.endswith(".lock")] == [provenance.HASH_CACHE_NAME]


def test_hidden_files_do_not_change_the_identity(tmp_path, hash_cache):
    model = save_tiny_model(tmp_path / "m")
    first = identity(model)
    meta = model / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    (meta / "model.safetensors.metadata").write_text("etag\n1712345678.9\n")  # what `hf download --local-dir` leaves
    assert identity(model) == first


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _hf_cache_snapshot(hub: Path, model: Path, commit: str, *, lie_about: str | None = None) -> Path:
    """Lay ``model`` out as the HF cache does: snapshot files are links to content-addressed blobs.

    LFS files (the weights) are named by their sha256, small git files by their git sha1.
    ``lie_about``: store that file under the blob name of other content.
    """
    repo = hub / "models--tydust--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / commit
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for path in sorted(p for p in model.iterdir() if p.is_file()):
        data = path.read_bytes()
        if path.suffix == ".safetensors":
            name = hashlib.sha256(data + (b"x" if path.name == lie_about else b"")).hexdigest()
        else:
            name = _git_blob_sha1(data)
        (blobs / name).write_bytes(data)
        (snap / path.name).symlink_to(Path("..", "..", "blobs", name))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def test_hf_cache_snapshot_uses_blob_names_for_the_weights(tmp_path, twin_models, hash_cache, reads):
    a, _ = twin_models
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = _hf_cache_snapshot(tmp_path / "hub", a, commit)
    ident = identity(snap)
    assert ident["revision"] == commit
    # the weights' content address is the blob's name: never read; the small git files are
    assert all(p.suffix != ".safetensors" for p in reads) and len(reads) == len(list(snap.iterdir())) - 1
    # the same bytes copied out of the cache are the same model
    plain = tmp_path / "plain"
    shutil.copytree(snap, plain)
    assert identity(plain)["dir_sha256"] == ident["dir_sha256"]
    # proof that the name, not the bytes, identified the weights in the cache
    liar = _hf_cache_snapshot(tmp_path / "hub2", a, commit, lie_about="model.safetensors")
    assert identity(liar)["dir_sha256"] != ident["dir_sha256"]


def test_hub_record_gets_the_commit_downloaded_during_the_load(tmp_path, twin_models, monkeypatch):
    """The identity is taken before the model loads; a first run downloads the snapshot only then."""
    import huggingface_hub.constants

    a, _ = twin_models
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    before = {"ref": "tydust/tiny", "hub_id": "tydust/tiny", "revision": None, "local_dir": None, "dir_sha256": None}
    assert provenance.with_revision(before) == before  # nothing cached yet
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    _hf_cache_snapshot(tmp_path / "hub", a, commit)
    assert provenance.with_revision(before) == {**before, "revision": commit}
