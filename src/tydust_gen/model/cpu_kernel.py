"""The decode step's CPU kernel: built from ``cpu_kernel.cpp`` on first use, MKL when it can't be.

The ``fast`` backend's CPU step multiplies each decoder weight by 2 rows (8 with
4 variations); that product is bound by reading the weight from memory, and
MKL's small-N sgemm reads at 50–80 % of what a plain ``sum()`` of the same bytes
reaches on our 2-core machine. ``cpu_kernel.cpp`` reads each weight in place (the
model's own row-major tensor, 4 rows side by side, no copy; see its header comment)
and runs all decoder layers of a step in one call (``layers_step``), so Python is
paid once a step (docs/BENCHMARKS.md).

Building: the first time a process needs the kernel, :func:`load` compiles the
source with the machine's C++ compiler (``$CXX``, else ``g++``/``c++``/``clang++``;
``-O3 -march=native``, torch's headers and libraries; about 10–25 s; the source
needs GCC ≥ 12 or a recent clang) into ``$TYDUST_KERNEL_CACHE`` (default
``~/.cache/tydust-gen``, or under ``$XDG_CACHE_HOME``), named by a hash of the
source, compiler path and version, flags, torch version and CPU features; later
runs load it in milliseconds. The library is written under a temporary name and
renamed into place, so concurrent or interrupted builds never leave a half-written
file that a later run would load. Before first use it is checked against ``torch.mm``.

A build the compiler rejects is remembered: a ``.failed`` file under the same
name holds the compiler's message, so later runs (and ``doctor``) say why at once
instead of failing the same 10–25 s build every time. Another compiler, compiler
version, source or torch gives another name, and is tried. A build that timed out
or could not start is not remembered (it may work next time).

No compiler, a failed build, an unusual weight shape, a non-float32 model, or
``TYDUST_CPU_KERNEL=0``: the step uses MKL (``(W @ xᵀ)ᵀ``) instead, the same
tokens up to float32 rounding, slower. Nothing fails because of the kernel;
``tydust-gen doctor`` and the provenance record say which one ran, and with which
compiler and flags it was built.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
DISABLE_ENV = "TYDUST_CPU_KERNEL"  # "0" turns the kernel off
CACHE_ENV = "TYDUST_KERNEL_CACHE"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
BUILD_TIMEOUT_S = 300
BLOCK_ROWS = 4  # output rows walked side by side (the kernel's kBlockRows): out % 4 == 0
CHUNK = 16  # input columns per vector (kChunk): in % 16 == 0
MAX_ROWS = 8  # the kernel handles 1 to 8 rows per call
FAILED_SUFFIX = ".failed"  # beside the library's name: a remembered compile failure
COMPILER_LOG_CHARS = 4000  # of the compiler's stderr kept in the .failed file


@dataclass(frozen=True)
class KernelStatus:
    """Whether the kernel is in use in this process.

    Attributes:
        available: loaded and checked.
        detail: the library's path, or why the MKL path is used instead.
        build: how the library in use was built (``compiler``, ``compiler_version``,
            ``flags``), or None when the kernel is not in use.
    """

    available: bool
    detail: str
    build: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        """``"native"`` or ``"mkl"``: what the provenance record stores."""
        return "native" if self.available else "mkl"


_status: KernelStatus | None = None
_built: dict[str, Any] | None = None  # the build of the library this process loaded


def cache_dir() -> Path:
    """Where built kernels are kept (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tydust-gen"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_command(compiler: str, source: Path, target: Path) -> list[str]:
    import torch

    # torch's own include and lib folders (torch.utils.cpp_extension would say the same,
    # but importing it logs a CUDA_HOME warning on machines without CUDA).
    root = Path(torch.__file__).resolve().parent
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    return [
        compiler,
        *FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{root / 'include'}",
        str(source),
        "-o",
        str(target),
        f"-L{root / 'lib'}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{root / 'lib'}",
    ]


def _compiler_version(compiler: str) -> str:
    """The first line of ``compiler --version`` ("" when it does not answer)."""
    try:
        out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return (out.strip().splitlines() or [""])[0]


def _build_info(compiler: str) -> dict[str, Any]:
    """What the provenance record keeps of a build: compiler path and version, flags."""
    import torch

    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    return {"compiler": compiler, "compiler_version": _compiler_version(compiler),
            "flags": [*FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]}  # fmt: skip


def _library_path(compiler: str) -> Path:
    import torch

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), compiler.encode(), _compiler_version(compiler).encode(),
                 " ".join(FLAGS).encode(), platform.machine().encode(), _cpu_features().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"tydust_cpu_kernel-{key.hexdigest()[:16]}.so"


def failure_path(target: Path) -> Path:
    """The file that remembers a compile failure of ``target``."""
    return target.with_name(target.name + FAILED_SUFFIX)


def _remember_failure(target: Path, compiler: str, why: str, log: str) -> None:
    """Write the ``.failed`` file whole (temp file + rename); a cache that can't be written only costs a retry."""
    body = {"error": why, **_build_info(compiler), "compiler_output": log[-COMPILER_LOG_CHARS:]}
    try:
        fd, tmp = tempfile.mkstemp(prefix=".failed-", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(body, f, indent=1)
            os.replace(tmp, failure_path(target))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass


def remembered_failure(target: Path) -> str | None:
    """Why an earlier build of ``target`` failed, as one line, or None when none is remembered."""
    path = failure_path(target)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        why = str(data["error"])
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        why = "the kernel did not compile"
    return f"{why}; remembered from an earlier build, delete {path} to try again"


def _first_error(stderr: str) -> str:
    """The compiler's first ``error:`` line (the cause), else its last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower():
            return line
    return lines[-1] if lines else "no message"


def _build(compiler: str, target: Path) -> str | None:
    """Compile into ``target`` atomically; returns None on success, else why not (one line).

    A compile error is remembered beside ``target`` (:func:`failure_path`).
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    except OSError as exc:
        return f"cannot write the kernel cache {target.parent}: {exc.strerror or exc}"
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            done = subprocess.run(
                _build_command(compiler, SOURCE, tmp), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return f"the C++ compiler did not run: {exc}"
        if done.returncode != 0:
            why = f"the kernel did not compile ({Path(compiler).name}: {_first_error(done.stderr)[:200]})"
            if done.returncode > 0:  # the compiler's verdict; a signal (killed, out of memory) may not recur
                _remember_failure(target, compiler, why, done.stderr)
            return why
        os.replace(tmp, target)
        return None
    finally:
        tmp.unlink(missing_ok=True)


def _already_registered() -> bool:
    import torch

    try:
        torch.ops.tydust.skinny_mm
    except (AttributeError, RuntimeError):
        return False
    return True


def _self_check() -> str | None:
    import torch

    gen = torch.Generator().manual_seed(0)
    for rows in (1, 2, 5, 8):
        w = torch.randn(24, 48, generator=gen)
        x = torch.randn(rows, 48, generator=gen)
        got = torch.ops.tydust.skinny_mm(x, [w[:8], w[8:]])  # two weights side by side = one
        if not torch.allclose(got, x @ w.t(), rtol=1e-4, atol=1e-4):
            return "the built kernel disagrees with torch.mm (not used)"
    return None


def load() -> KernelStatus:
    """Build (first time) and load the kernel; the answer is kept for the process.

    Never raises for a missing compiler or a failed build: the status says why,
    and callers fall back to MKL. A compile failure remembered from an earlier
    run is not retried (see the module docstring).
    """
    global _status, _built
    if _status is not None:
        return _status
    if turned_off():
        _status = KernelStatus(False, f"turned off by {DISABLE_ENV}=0")
        return _status
    import torch

    if _already_registered():
        _status = KernelStatus(True, "already loaded", _built)
        return _status
    compiler = _compiler()
    if compiler is None:
        _status = KernelStatus(False, "no C++ compiler (g++, c++ or clang++) on PATH")
        return _status
    target = _library_path(compiler)
    if not target.is_file():
        why = remembered_failure(target) or _build(compiler, target)
        if why is not None:
            _status = KernelStatus(False, why)
            return _status
    try:
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError) as exc:
        _status = KernelStatus(False, f"the built kernel did not load: {str(exc).splitlines()[0][:200]}")
        return _status
    why = _self_check()
    if why is None:
        _built = _build_info(compiler)
    _status = KernelStatus(why is None, why or str(target), _built)
    return _status


def turned_off() -> bool:
    """``TYDUST_CPU_KERNEL=0`` is set."""
    return os.environ.get(DISABLE_ENV, "").strip() == "0"


def pending_build() -> bool:
    """Whether :func:`load` would compile now (nothing loaded yet, a compiler, no cached library)."""
    if _status is not None or turned_off() or _already_registered():
        return False
    compiler = _compiler()
    if compiler is None:
        return False
    target = _library_path(compiler)
    return not target.is_file() and not failure_path(target).is_file()


def status() -> KernelStatus | None:
    """The status :func:`load` settled on in this process, or None when nothing asked for the kernel."""
    return _status


def can_read(weight) -> bool:
    """Whether the kernel can read ``weight [out, in]`` in place (float32, CPU, contiguous, out % 4 == 0, in % 16 == 0)."""
    import torch

    return (
        weight.dim() == 2
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and weight.shape[0] % BLOCK_ROWS == 0
        and weight.shape[1] % CHUNK == 0
    )


def skinny_mm(x, weights):
    """``x [rows, in]`` (1–8 rows, float32) times each ``[out_i, in]`` weight → ``[rows, Σ out_i]``.

    ``weights``: one tensor, or a list whose products come out side by side (as
    with the weights stacked, without stacking them).

    Raises:
        ValueError: a dtype, device, layout or shape the kernel cannot read (checked
            in the kernel before any memory is touched).
    """
    import torch

    return torch.ops.tydust.skinny_mm(x, [weights] if isinstance(weights, torch.Tensor) else list(weights))
