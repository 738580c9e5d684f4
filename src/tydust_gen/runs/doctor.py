"""``tydust-gen doctor``: what this machine has, and a self-test that needs no download.

:func:`run_checks` reports torch and CUDA (GPU name, free memory), ffmpeg (where
it came from and its encoders), the CPU decode kernel (built on first use),
whether the model is in the local Hugging Face
cache (and its size), and free disk space in the output folder. A check marked
``required`` that fails makes ``doctor`` exit 3.

:func:`selftest` runs the whole pipeline — tiny random MusicGen saved with
``save_pretrained``, a 1 s track, MP3 + OGG + provenance record, verification —
in a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tydust_gen import __version__
from tydust_gen.base.errors import TydustError
from tydust_gen.export.ffmpeg import check_encoders, find_ffmpeg

LOW_DISK_BYTES = 500 * 1000**2  # warn below 500 MB free; a 90 s take is ~5 MB but the model cache is GBs
SELFTEST_DURATION_S = 1.0  # seconds


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report.

    Attributes:
        name: what was checked.
        ok: it works (or is merely informative).
        detail: what was found, or what to do.
        required: a failure makes ``doctor`` exit non-zero.
    """

    name: str
    ok: bool
    detail: str
    required: bool = True


def folder_size(folder: Path) -> int:
    """Bytes under ``folder`` (each blob once: the HF cache links snapshots to blobs)."""
    seen, total = set(), 0
    for p in folder.rglob("*"):
        try:
            st = p.stat()
        except OSError:
            continue
        if p.is_file() and st.st_ino not in seen:
            seen.add(st.st_ino)
            total += st.st_size
    return total


def _gb(n: float) -> str:
    return f"{n / 1000**3:.2f} GB" if n >= 1000**3 else f"{n / 1000**2:.1f} MB"


def check_torch() -> list[Check]:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return [Check("torch", False, f"cannot import torch ({exc}); reinstall tydust-gen")]
    checks = [Check("torch", True, f"torch {torch.__version__}")]
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        name = torch.cuda.get_device_name(0)
        checks.append(Check("CUDA", True, f"{name}, {_gb(free)} free of {_gb(total)}", required=False))
    else:
        checks.append(Check("CUDA", True, "no CUDA GPU; tracks generate on the CPU (slow)", required=False))
    return checks


def check_model_sizes() -> list[Check]:
    """Which published MusicGen sizes fit this machine's free memory for a 30 s track (estimates, model/memory.py)."""
    import torch

    from tydust_gen.model import memory

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    free = memory.available_bytes(device)
    if free is None:
        return [Check("model sizes", True, "free memory unknown on this system; sizes not checked", required=False)]
    parts = []
    for size in memory.KNOWN_SIZES:
        need = memory.estimate_known_size(size, dtype_bytes=2 if device.type == "cuda" else 4)
        parts.append(f"{size} {memory.gb(need.total)} {'fits' if need.total <= free else 'does not fit'}")
    return [Check("model sizes", True, f"{', '.join(parts)} ({memory.gb(free)} free on {device.type})", required=False)]


def check_cpu_kernel() -> list[Check]:
    """The fast backend's CPU kernel (built here on first use; optional, MKL otherwise)."""
    from tydust_gen.model import cpu_kernel

    state = cpu_kernel.load()
    if state.available:
        return [Check("CPU kernel", True, f"built: {state.detail}", required=False)]
    return [Check("CPU kernel", True, f"not in use ({state.detail}); CPU decoding uses MKL, about 1.3x slower", required=False)]


def check_ffmpeg() -> list[Check]:
    from tydust_gen.export.ffmpeg import REQUIRED_ENCODERS, check_encoders, find_ffmpeg

    try:
        ff = find_ffmpeg()
        check_encoders(ff)
    except TydustError as exc:
        return [Check("ffmpeg", False, str(exc))]
    return [Check("ffmpeg", True, f"{ff.version} ({ff.source}: {ff.path}); encoders {', '.join(REQUIRED_ENCODERS)}")]


def check_model(model_ref: str) -> list[Check]:
    from tydust_gen.model.loading import offline_mode, resolve_source
    from tydust_gen.runs.provenance import cached_snapshot, model_identity

    try:
        source = resolve_source(model_ref)
    except TydustError as exc:
        return [Check("model", False, str(exc))]
    if source.local_dir is not None:
        return [Check("model", True, f"local folder {source.local_dir}, {_gb(folder_size(source.local_dir))}")]
    snap = cached_snapshot(source.hub_id)
    if snap is None:
        what = f"{model_ref} is not in the local Hugging Face cache"
        if offline_mode():
            return [Check("model", False, f"{what} and HF_HUB_OFFLINE is set; run `hf download {model_ref}` on a connected machine")]
        return [Check("model", False, f"{what}; the first run downloads it (~2.4 GB for musicgen-small)", required=False)]
    repo_dir = snap.parent.parent
    rev = model_identity(source).get("revision") or "?"
    return [Check("model", True, f"{model_ref} cached at revision {rev[:12]}, {_gb(folder_size(repo_dir))}")]


def check_disk(out_dir: Path) -> list[Check]:
    from tydust_gen.export.staging import check_output_dir

    try:
        check_output_dir(out_dir)
    except TydustError as exc:
        return [Check("output folder", False, str(exc))]
    probe = out_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    low = free < LOW_DISK_BYTES
    return [Check("output folder", not low, f"{out_dir}: {_gb(free)} free" + (" (low)" if low else ""), required=low and free < 50 * 1000**2)]


def run_checks(model_ref: str, out_dir: Path) -> list[Check]:
    """Every check, in report order."""
    return [Check("tydust-gen", True, __version__, required=False), *check_torch(), *check_model_sizes(), *check_cpu_kernel(), *check_ffmpeg(), *check_model(model_ref), *check_disk(out_dir)]


def selftest() -> Check:
    """Generate, export and verify a 1 s track on a tiny random model in a temporary folder, then remove it."""
    import torch

    from tydust_gen.model import loading as engine
    from tydust_gen.model.backends import make_backend
    from tydust_gen.model.tiny import save_tiny_model
    from tydust_gen.runs import pipeline, provenance

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tydust-selftest-") as tmp:
        root = Path(tmp)
        try:
            model_dir = save_tiny_model(root / "tiny-musicgen")
            (root / "prompts").mkdir()
            (root / "prompts" / "selftest.txt").write_text("calm synth menu music\n", encoding="utf-8")
            plan = pipeline.plan_track(
                "selftest",
                cli_settings={"duration": str(SELFTEST_DURATION_S), "seed": "1"},
                prompts_dir=root / "prompts",
                out_dir=root / "out",
                overwrite=False,
            )
            ffmpeg = find_ffmpeg()
            check_encoders(ffmpeg)
            source = engine.resolve_source(str(model_dir))
            loaded = engine.load_model(source, torch.device("cpu"))
            result = pipeline.render_track(
                loaded, plan, ffmpeg=ffmpeg, backend=make_backend(plan.settings.backend),
                record_model=provenance.model_identity(source),
            )  # fmt: skip
            record = provenance.read_record(provenance.record_path(plan.out_dir, "selftest"))
            problem = provenance.check_current(
                record, spec=plan.spec, settings=plan.settings, mastering=plan.mastering, seed_given=True,
                out_dir=plan.out_dir, model=None,
            )
            if problem:
                return Check("selftest", False, f"the take did not verify: {problem}")
        except TydustError as exc:
            return Check("selftest", False, str(exc))
    took = time.perf_counter() - started
    sizes = ", ".join(f"{f.format} {f.size_bytes} B" for f in result.files)
    return Check("selftest", True, f"tiny model → {SELFTEST_DURATION_S:g} s track → {sizes} + record, verified in {took:.1f} s; temporary files removed")
