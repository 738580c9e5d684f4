"""Provenance: ``NAME.json`` beside ``NAME.mp3``/``NAME.ogg`` says exactly how a take was made.

The record holds the prompt text and the prompt file's sha256, every generation
setting actually used (the seed included, also when it was picked at random),
the model (hub id + snapshot commit from the Hugging Face cache, or a hash of a
local snapshot folder, see :func:`model_identity`), device and dtype, package
and ffmpeg versions, per-stage timings, and each output file's size, duration,
bitrate and sha256.

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
import re
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
SMALL_FILE_BYTES = 1 << 20  # files up to 1 MiB (configs, tokenizer) are hashed by content, larger ones by name + size
PACKAGES = ("tydust-gen", "torch", "torchaudio", "transformers", "pydub", "mutagen", "numpy", "scipy", "pyloudnorm", "imageio-ffmpeg")
_COMMIT = re.compile(r"[0-9a-f]{40}")


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


def dir_sha256(folder: Path) -> str:
    """sha256 over a snapshot folder: every file's relative name and size, plus the content of files ≤ 1 MiB.

    Configs and the tokenizer are hashed by content; multi-GB weights by name and
    size only, so this takes milliseconds even for the real model.
    """
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        size = path.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        if size <= SMALL_FILE_BYTES:
            h.update(path.read_bytes())
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

    Hub ids: the snapshot commit hash from the cache path. Local folders: a
    :func:`dir_sha256`, and the commit when the folder is itself a cache snapshot.
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


def same_model(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
    """Same weights: equal folder hashes, or the same hub id with no conflicting commit."""
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
        },
        "metadata": {"title": spec.title, "genre": spec.genre, "folder": spec.folder, "bpm": spec.bpm},
        # The take's own settings: for a take of a batch of variations its seed is the take's.
        "settings": to_jsonable(result.settings if result.settings is not None else plan.settings),
        "mastering": to_jsonable(plan.mastering),
        "seed_was_random": plan.seed_was_random,
        "model": model,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        # CPU matmul of the fast decode step: "native" (tydust_gen.model.cpu_kernel) or "mkl"; None when unused.
        "cpu_kernel": _kernel_label(),
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


def check_current(
    record: dict[str, Any] | None,
    *,
    spec,
    settings: GenerationSettings,
    mastering=None,
    seed_given: bool,
    out_dir: Path,
    model: dict[str, Any] | None,
) -> str | None:
    """Why the take in ``out_dir`` is not the one these inputs would make, or None when it is.

    Compares the prompt file hash, every setting (the seed only when one is
    given: a random seed matches any), the model, and the files' sizes and sha256.
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
