"""Provenance: ``NAME.json`` beside ``NAME.mp3``/``NAME.ogg`` says exactly how a take was made.

The record holds the prompt text and the prompt file's sha256, every generation
setting actually used (the seed included, also when it was picked at random),
the model (hub id + snapshot commit from the Hugging Face cache, or a content
hash of a local snapshot folder, see :func:`model_identity`), device and dtype,
the CPU kernel and its compiler, package and ffmpeg versions, per-stage
timings, and each output file's size, duration, bitrate and sha256.

It is staged with the audio and moved into place *after* both audio files (see
``export.export_track(sidecar=...)``), so its presence marks a complete take;
the recorded sha256 values tell whether the audio beside it is still that take.
:class:`~tydust_gen.runs.pipeline.TrackResult` is serialised generically, so fields
added to it later appear in the record without changes here.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import math
import os
import re
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from tydust_gen.base.errors import UsageError
from tydust_gen.base.settings import (
    GenerationSettings,
    MasteringSettings,
    SamplingSettings,
)
from tydust_gen.export.verify import sha256_file

RECORD_FORMAT = "tydust-gen/provenance"
RECORD_VERSION = 1
RECORD_SUFFIX = ".json"
CACHE_ENV = "TYDUST_CACHE"  # folder of tydust-gen's small caches (default ~/.cache/tydust-gen)
HASH_CACHE_NAME = "model-file-hashes.json"  # sha256 of model files, by (resolved path, size, mtime_ns)
HASH_CACHE_VERSION = 1
HASH_CACHE_LOCK_TIMEOUT_S = 30  # seconds; past this the cache is simply not updated this run
PACKAGES = ("tydust-gen", "torch", "torchaudio", "transformers", "pydub", "mutagen", "numpy", "scipy", "pyloudnorm", "imageio-ffmpeg")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def record_path(out_dir: Path, name: str) -> Path:
    """``OUT_DIR/NAME.json``."""
    return out_dir / f"{name}{RECORD_SUFFIX}"


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, Paths, dicts, lists, floats (NaN/inf → None) and anything else (→ str) as JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def user_cache_dir() -> Path:
    """tydust-gen's cache folder: ``$TYDUST_CACHE``, else ``$XDG_CACHE_HOME/tydust-gen``, else ``~/.cache/tydust-gen``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tydust-gen"


def _content_sha256(path: Path) -> str:
    """sha256 of a file's bytes (the one place model files are read; tests count the calls)."""
    return sha256_file(path)


class _HashCache:
    """sha256 of files keyed by (resolved path, size, mtime_ns), kept in one JSON file.

    Hashing the 2.4 GB of musicgen-small takes seconds; a re-run should not pay
    that again for files that have not changed. A file rewritten with the same
    size *and* the same mtime_ns is not noticed (the trust make and rsync place
    in mtimes). A cache that cannot be read or written only costs speed: the
    files are hashed again, nothing fails.
    """

    def __init__(self, path: Path):
        self.path = path
        self.entries = self._read()
        self.new: dict[str, dict[str, Any]] = {}

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}
        if not isinstance(data, dict) or data.get("version") != HASH_CACHE_VERSION or not isinstance(data.get("files"), dict):
            return {}
        return data["files"]

    def sha256(self, path: Path) -> str:
        real = path.resolve()
        st = real.stat()
        key = str(real)
        entry = self.entries.get(key)
        if (
            isinstance(entry, dict)
            and entry.get("size") == st.st_size
            and entry.get("mtime_ns") == st.st_mtime_ns
            and isinstance(entry.get("sha256"), str)
            and _SHA256.fullmatch(entry["sha256"])
        ):
            return entry["sha256"]
        digest = _content_sha256(real)
        self.entries[key] = self.new[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        return digest

    def save(self) -> None:
        """Merge this run's new entries into the file under a lock; write it whole (temp file + rename)."""
        if not self.new:
            return
        from filelock import FileLock, Timeout

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.path) + ".lock", timeout=HASH_CACHE_LOCK_TIMEOUT_S):
                merged = {**self._read(), **self.new}
                # Forget files that are gone, so the cache does not grow with every deleted model copy.
                merged = {k: v for k, v in merged.items() if os.path.exists(k)}
                body = json.dumps({"version": HASH_CACHE_VERSION, "files": merged}, indent=1, sort_keys=True)
                fd, tmp = tempfile.mkstemp(prefix=".hashes-", suffix=".tmp", dir=self.path.parent)
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        f.write(body)
                    os.replace(tmp, self.path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
        except (OSError, Timeout):
            pass  # a read-only or busy cache folder: the next run hashes again
        self.new = {}


def _file_digest(path: Path, cache: _HashCache) -> str:
    """The sha256 of one model file's content.

    In the Hugging Face cache a snapshot's files are links into ``blobs/``, and an
    LFS file's blob is named by the sha256 of its content (the hub's own content
    address), so multi-GB weights cost no read. Small files stored in git are
    named by their git sha1 instead, and plain folders have no names to trust:
    those are hashed (through ``cache``).
    """
    real = path.resolve()
    if real.parent.name == "blobs" and _SHA256.fullmatch(real.name):
        return real.name
    return cache.sha256(path)


def dir_sha256(folder: Path) -> str:
    """sha256 over a snapshot folder: every file's relative name, size and content sha256.

    Hidden files and folders (``.cache/`` of ``hf download --local-dir``, lock
    files) are left out: loading never reads them and they change on their own.
    Content hashes come from the HF cache's blob names where the folder is a
    cache snapshot, else from :class:`_HashCache` (``$TYDUST_CACHE``), so only
    new or changed files are read.
    """
    cache = _HashCache(user_cache_dir() / HASH_CACHE_NAME)
    h = hashlib.sha256()
    try:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = path.relative_to(folder)
            if any(part.startswith(".") for part in rel.parts):
                continue
            h.update(f"{rel.as_posix()}\0{path.stat().st_size}\0{_file_digest(path, cache)}\0".encode())
    finally:
        cache.save()
    return h.hexdigest()


def cached_snapshot(hub_id: str) -> Path | None:
    """The HF cache snapshot folder of ``hub_id`` (…/snapshots/<commit>), or None when not cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    found = try_to_load_from_cache(hub_id, "config.json")
    return Path(found).parent if isinstance(found, str) else None


def model_identity(source) -> dict[str, Any]:
    """What pins the weights: ``{"ref", "hub_id", "revision", "local_dir", "dir_sha256"}``.

    Hub ids: the snapshot commit hash from the cache path (a hub commit pins every
    file's content). Local folders: :func:`dir_sha256` of the files' content, so a
    fine-tune with the same file names and shapes is another model; and the
    commit when the folder is itself a cache snapshot.
    """
    ident: dict[str, Any] = {"ref": source.ref, "hub_id": source.hub_id, "revision": None, "local_dir": None, "dir_sha256": None}
    folder = source.local_dir
    if source.hub_id is not None:
        folder = cached_snapshot(source.hub_id)
        if folder is not None and _COMMIT.fullmatch(folder.name):
            ident["revision"] = folder.name
        return ident
    ident["local_dir"] = str(folder)
    ident["dir_sha256"] = dir_sha256(folder)
    if folder.parent.name == "snapshots" and _COMMIT.fullmatch(folder.name):
        ident["revision"] = folder.name
    return ident


def with_revision(model: dict[str, Any]) -> dict[str, Any]:
    """``model`` with the hub snapshot's commit filled in when it was not cached yet.

    A run's identity is taken before the model loads; on the first run of a hub
    id the snapshot is only downloaded by the load, so its commit is looked up
    again for the record.
    """
    if model.get("hub_id") and model.get("revision") is None:
        folder = cached_snapshot(model["hub_id"])
        if folder is not None and _COMMIT.fullmatch(folder.name):
            return {**model, "revision": folder.name}
    return model


def same_model(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """Same weights: equal folder content hashes, or the same hub id with no conflicting commit.

    Records written before folder hashes covered the weights' content (when they
    hashed names and sizes) never match a current hash: such a take cannot be
    shown to come from these weights.
    """
    if recorded.get("dir_sha256") or current.get("dir_sha256"):
        return recorded.get("dir_sha256") == current.get("dir_sha256")
    if recorded.get("hub_id") != current.get("hub_id"):
        return False
    a, b = recorded.get("revision"), current.get("revision")
    return a is None or b is None or a == b


def _kernel_label() -> str | None:
    from tydust_gen.model import cpu_kernel

    state = cpu_kernel.status()
    return None if state is None else state.label


def _kernel_build() -> dict[str, Any] | None:
    """Compiler (path, version) and flags of the native kernel in use, or None (MKL, or not asked for)."""
    from tydust_gen.model import cpu_kernel

    state = cpu_kernel.status()
    return None if state is None or not state.available else state.build


def precision(loaded) -> dict[str, str]:
    """The dtype each part of the model actually holds, and what the decode loops keep in fp32."""
    model = loaded.model

    def held(module) -> str:
        return str(next(module.parameters()).dtype).replace("torch.", "")

    return {
        "text_encoder": held(model.text_encoder),
        "decoder_weights": held(model.decoder),
        "audio_encoder": held(model.audio_encoder),
        "fast_loop_residual_norms_softmax": "float32",
    }


def build_record(plan, result, *, loaded, ffmpeg, model: dict[str, Any]) -> dict[str, Any]:
    """The provenance record of a finished take (files with their final paths)."""
    spec = plan.spec
    res = to_jsonable(result)
    take_name = res.pop("name", spec.name)
    files = res.pop("files", [])
    for f in files:
        f["path"] = Path(f["path"]).name  # relative: the record lives beside the files
    res.pop("settings", None)
    return {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "track": spec.name,
        "take": take_name,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "prompt": {
            "text": spec.prompt,
            "text_sha256": hashlib.sha256(spec.prompt.encode()).hexdigest(),
            "file": str(spec.path),
            "file_sha256": sha256_file(spec.path) if spec.path.is_file() else None,
            # [[section]] tables as the run used them (the first at 0 s); [] for a one-prompt track
            "sections": [to_jsonable(section) for section in spec.sections],
        },
        "metadata": {"title": spec.title, "genre": spec.genre, "folder": spec.folder, "bpm": spec.bpm},
        # The take's own settings: for a take of a batch of variations its seed is the take's.
        "settings": to_jsonable(result.settings if result.settings is not None else plan.settings),
        "mastering": to_jsonable(plan.mastering),
        "seed_was_random": plan.seed_was_random,
        "model": with_revision(model),
        # mono / stereo / melody: which MusicGen family made the take (stereo: left and right from the model)
        "model_family": loaded.family,
        # the audio whose tail prompted the first window: {"path", "track", "sha256", "context_s", "prompt_frames"}
        "continuation": result.continuation,
        # the tune a melody model followed: {"path", "sha256", "duration_s", "windows": each window's stretch}
        "melody": result.melody,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),  # the decoder's compute dtype (--dtype)
        "precision": precision(loaded),
        # CPU matmul of the fast decode step: "native" (tydust_gen.model.cpu_kernel) or "mkl"; None when unused.
        "cpu_kernel": _kernel_label(),
        # How the native kernel was built: {"compiler", "compiler_version", "flags"}; None when it did not run.
        "cpu_kernel_build": _kernel_build(),
        "versions": {**package_versions(), "ffmpeg": ffmpeg.version},
        "ffmpeg": {"path": ffmpeg.path, "source": ffmpeg.source},
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        "result": res,
        "files": files,
    }


def record_bytes(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def sidecar_for(plan, result_so_far, **kw):
    """A callback for ``export_track(sidecar=...)`` writing ``NAME.json`` with the verified files."""

    def make(files):
        result = dataclasses.replace(result_so_far, files=list(files))
        return {record_path(plan.out_dir, result.name).name: record_bytes(build_record(plan, result, **kw))}

    return make


def read_record(path: Path) -> dict[str, Any]:
    """Load and sanity-check a record.

    Raises:
        UsageError: missing, unreadable or not a tydust-gen record.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path} does not exist; pass the .json written beside a track") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path} is not a readable provenance record ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        raise UsageError(f"{path} is not a tydust-gen provenance record")
    if data.get("version") != RECORD_VERSION:
        raise UsageError(f"{path} has record version {data.get('version')!r}; this tydust-gen reads version {RECORD_VERSION}")
    return data


def settings_from_record(data: dict[str, Any]) -> GenerationSettings:
    s = dict(data["settings"])
    s["sampling"] = SamplingSettings(**s["sampling"])
    return GenerationSettings(**s)


def mastering_from_record(data: dict[str, Any]) -> MasteringSettings:
    return MasteringSettings(**data.get("mastering", {}))


def _input_file_changed(what: str, path: Path | None, recorded_sha256: str | None) -> str | None:
    """Why an input file of a take (a melody, continued audio) is not the recorded one, or None when it is."""
    if (path is None) != (recorded_sha256 is None):
        return f"the {what} changed"
    if path is None:
        return None
    if not path.is_file():
        return f"the {what} {path} is missing"
    if sha256_file(path) != recorded_sha256:
        return f"the {what} changed"
    return None


def check_current(
    record: dict[str, Any] | None,
    *,
    spec,
    settings: GenerationSettings,
    mastering=None,
    seed_given: bool,
    out_dir: Path,
    model: dict[str, Any] | None,
    melody: Path | None = None,
    continuation: Path | None = None,
) -> str | None:
    """Why the take in ``out_dir`` is not the one these inputs would make, or None when it is.

    Compares the prompt file hash, every setting (the seed only when one is
    given: a random seed matches any), the model, the melody file (``melody``) and
    the continued audio (``continuation``), both by sha256, and the files' sizes and sha256.
    """
    if record is None:
        return "no provenance record"
    if record.get("prompt", {}).get("file_sha256") != sha256_file(spec.path):
        return "the prompt file changed"
    mine = to_jsonable(settings)
    theirs = dict(record.get("settings", {}))
    if not seed_given:
        mine.pop("seed", None)
        theirs.pop("seed", None)
    if mine != theirs:
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        return f"settings differ ({', '.join(diff)})"
    if mastering is not None and to_jsonable(mastering) != record.get("mastering"):
        return "mastering settings differ"
    if model is not None and not same_model(record.get("model", {}), model):
        return "made with another model"
    for what, path, key in (("melody", melody, "melody"), ("continued audio", continuation, "continuation")):
        why = _input_file_changed(what, path, (record.get(key) or {}).get("sha256"))
        if why:
            return why
    for f in record.get("files", []):
        path = out_dir / f["path"]
        if not path.is_file():
            return f"{path.name} is missing"
        if path.stat().st_size != f["size_bytes"] or sha256_file(path) != f["sha256"]:
            return f"{path.name} changed since it was recorded"
    if not record.get("files"):
        return "the record lists no files"
    return None


def load_if_present(out_dir: Path, name: str) -> dict[str, Any] | None:
    """The record beside a track, or None when absent or unreadable."""
    path = record_path(out_dir, name)
    if not path.is_file():
        return None
    try:
        return read_record(path)
    except UsageError:
        return None
