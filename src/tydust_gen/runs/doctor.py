"""``tydust-gen doctor``: what this machine has, and a self-test that needs no download.

:func:`run_checks` reports torch and CUDA (each GPU: name, free/total memory, compute
capability, native bf16, whether a tiny CUDA graph captures and replays; the
``--device`` asked for), ffmpeg (where
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
from typing import Any

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
        data: the same facts as fields, for ``--json`` (GPUs), or None.
    """

    name: str
    ok: bool
    detail: str
    required: bool = True
    data: dict[str, Any] | None = None


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


def probe_graph_capture(device) -> str | None:
    """Capture and replay a two-op CUDA graph on ``device``; None when it works, else why not (one line)."""
    import torch

    try:
        with torch.cuda.device(device):
            x = torch.ones(8, device=device)
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capture, as fast._StepGraph does
                y = x * 2 + 1
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = x * 2 + 1
            x.fill_(3.0)
            graph.replay()
            torch.cuda.synchronize(device)
            if y.tolist() != [7.0] * 8:
                return f"replay gave {y.tolist()[:2]}…, not 7.0"
    except Exception as exc:  # noqa: BLE001 - any failure means "do not use graphs here"; the reason is shown
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return None


def gpu_check(index: int) -> Check:
    """One GPU: name, memory, compute capability, native bf16, CUDA-graph capture."""
    import torch

    from tydust_gen.model.loading import cuda_bf16

    device = torch.device("cuda", index)
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    major, minor = torch.cuda.get_device_capability(index)
    bf16 = cuda_bf16(device)
    graph_problem = probe_graph_capture(device)
    data = {
        "index": index,
        "name": props.name,
        "memory_total_bytes": int(total),
        "memory_free_bytes": int(free),
        "compute_capability": f"{major}.{minor}",
        "bf16": bf16,
        "cuda_graphs": graph_problem is None,
        "cuda_graph_problem": graph_problem,
        "auto_dtype": "bf16" if bf16 else "fp16",
    }
    detail = (
        f"{props.name}, {_gb(free)} free of {_gb(total)}, compute {major}.{minor}, "
        f"bf16 {'yes' if bf16 else 'no'} (--dtype auto: {data['auto_dtype']}), "
        + ("CUDA graphs capture" if graph_problem is None else f"CUDA graphs FAIL ({graph_problem}); the fast backend falls back to eager")
    )
    return Check(f"cuda:{index}", True, detail, required=False, data=data)


def check_torch(device_name: str = "auto") -> list[Check]:
    """torch's version, every CUDA GPU (or "no CUDA GPU"), and whether ``--device device_name`` resolves."""
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        return [Check("torch", False, f"cannot import torch ({exc}); reinstall tydust-gen")]
    from tydust_gen.model.loading import resolve_device

    checks = [Check("torch", True, f"torch {torch.__version__}, CUDA {torch.version.cuda or 'not built in'}")]
    if torch.cuda.is_available():
        checks += [gpu_check(i) for i in range(torch.cuda.device_count())]
    else:
        checks.append(Check("CUDA", True, "no CUDA GPU; tracks generate on the CPU (slow)", required=False))
    try:
        device, fell_back = resolve_device(device_name)
    except TydustError as exc:
        checks.append(Check("device", False, str(exc)))
    else:
        what = f"--device {device_name} → {device}" + (" (no GPU found)" if fell_back else "")
        checks.append(Check("device", True, what, required=False, data={"device": str(device)}))
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


def run_checks(model_ref: str, out_dir: Path, device_name: str = "auto") -> list[Check]:
    """Every check, in report order."""
    return [Check("tydust-gen", True, __version__, required=False), *check_torch(device_name), *check_model_sizes(), *check_cpu_kernel(), *check_ffmpeg(), *check_model(model_ref), *check_disk(out_dir)]


def selftest(device_name: str = "cpu") -> Check:
    """Generate, export and verify a 1 s track on a tiny random model in a temporary folder, then remove it.

    ``device_name`` (``doctor --device``) picks where it runs, CPU by default; on a GPU it goes
    through the self-check and the fallback ladder like a real run.
    """
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
            device, _ = engine.resolve_device(device_name)
            loaded = engine.load_model(source, device)
            backend = make_backend(plan.settings.backend, self_check=True)
            result = pipeline.render_track(
                loaded, plan, ffmpeg=ffmpeg, backend=backend,
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
    path = (result.decode_path or {}).get("path", plan.settings.backend)
    return Check(
        "selftest", True,
        f"tiny model on {loaded.device} ({loaded.dtype}, {path}) → {SELFTEST_DURATION_S:g} s track → {sizes} + record, "
        f"verified in {took:.1f} s; temporary files removed",
        data={"device": str(loaded.device), "decode_path": result.decode_path},
    )  # fmt: skip
