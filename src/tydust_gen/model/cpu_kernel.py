"""The decode step's CPU kernel: built from ``cpu_kernel.cpp`` on first use, MKL when it can't be.

The ``fast`` backend's CPU step multiplies each decoder weight by 2 rows (8 with
4 variations); that product is bound by reading the weight from memory, and
MKL's small-N sgemm reads at 50–80 % of what a plain ``sum()`` of the same bytes
reaches on our 2-core machine. ``cpu_kernel.cpp`` reads a blocked copy of each
weight as one sequential stream per thread (see its header comment) and gets to
0.8–0.94 of the ``sum()`` rate; it also runs all decoder layers of a step in one
call (``layers_step``), so Python is paid once a step (docs/BENCHMARKS.md).

Building: the first time a process needs the kernel, :func:`load` compiles the
source with the machine's C++ compiler (``$CXX``, else ``g++``/``c++``/``clang++``;
``-O3 -march=native``, torch's headers and libraries; about 10–25 s) into
``$TYDUST_KERNEL_CACHE`` (default ``~/.cache/tydust-gen``, or under
``$XDG_CACHE_HOME``), named by a hash of the source, compiler, flags, torch version
and CPU features; later runs load it in milliseconds. The library is written under
a temporary name and renamed into place, so concurrent or interrupted builds never
leave a half-written file that a later run would load. Before first use it is
checked against ``torch.mm``.

No compiler, a failed build, an unusual weight shape, a non-float32 model, or
``TYDUST_CPU_KERNEL=0``: the step uses MKL (``(W @ xᵀ)ᵀ``) instead, the same
tokens up to float32 rounding, slower. Nothing fails because of the kernel;
``tydust-gen doctor`` and the provenance record say which one ran.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
DISABLE_ENV = "TYDUST_CPU_KERNEL"  # "0" turns the kernel off
CACHE_ENV = "TYDUST_KERNEL_CACHE"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
BUILD_TIMEOUT_S = 300
BLOCK_ROWS = 4  # output rows per block (the kernel's kBlockRows)
CHUNK = 16  # input columns per chunk (kChunk)
MAX_ROWS = 8  # the kernel handles 1 to 8 rows per call


@dataclass(frozen=True)
class KernelStatus:
    """Whether the kernel is in use in this process.

    Attributes:
        available: loaded and checked.
        detail: the library's path, or why the MKL path is used instead.
    """

    available: bool
    detail: str

    @property
    def label(self) -> str:
        """``"native"`` or ``"mkl"``: what the provenance record stores."""
        return "native" if self.available else "mkl"


_status: KernelStatus | None = None


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


def _library_path(compiler: str) -> Path:
    import torch

    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), compiler.encode(), version.encode(),
                 " ".join(FLAGS).encode(), platform.machine().encode(), _cpu_features().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"tydust_cpu_kernel-{key.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> str | None:
    """Compile into ``target`` atomically; returns None on success, else why not (one line)."""
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
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            return f"the kernel did not compile ({Path(compiler).name}: {last[:200]})"
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
        got = torch.ops.tydust.skinny_mm(x, block_weight(w))
        if not torch.allclose(got, x @ w.t(), rtol=1e-4, atol=1e-4):
            return "the built kernel disagrees with torch.mm (not used)"
    return None


def load() -> KernelStatus:
    """Build (first time) and load the kernel; the answer is kept for the process.

    Never raises for a missing compiler or a failed build: the status says why,
    and callers fall back to MKL.
    """
    global _status
    if _status is not None:
        return _status
    if turned_off():
        _status = KernelStatus(False, f"turned off by {DISABLE_ENV}=0")
        return _status
    import torch

    if _already_registered():
        _status = KernelStatus(True, "already loaded")
        return _status
    compiler = _compiler()
    if compiler is None:
        _status = KernelStatus(False, "no C++ compiler (g++, c++ or clang++) on PATH")
        return _status
    target = _library_path(compiler)
    if not target.is_file():
        why = _build(compiler, target)
        if why is not None:
            _status = KernelStatus(False, why)
            return _status
    try:
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError) as exc:
        _status = KernelStatus(False, f"the built kernel did not load: {str(exc).splitlines()[0][:200]}")
        return _status
    why = _self_check()
    _status = KernelStatus(why is None, why or str(target))
    return _status


def turned_off() -> bool:
    """``TYDUST_CPU_KERNEL=0`` is set."""
    return os.environ.get(DISABLE_ENV, "").strip() == "0"


def pending_build() -> bool:
    """Whether :func:`load` would compile now (nothing loaded yet, a compiler, no cached library)."""
    if _status is not None or turned_off() or _already_registered():
        return False
    compiler = _compiler()
    return compiler is not None and not _library_path(compiler).is_file()


def status() -> KernelStatus | None:
    """The status :func:`load` settled on in this process, or None when nothing asked for the kernel."""
    return _status


def can_block(weight) -> bool:
    """Whether ``weight [out, in]`` has the kernel's shape and type (out % 4 == 0, in % 16 == 0, float32, CPU)."""
    import torch

    return (
        weight.dim() == 2
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.shape[0] % BLOCK_ROWS == 0
        and weight.shape[1] % CHUNK == 0
    )


def block_weight(weight):
    """``[out, in]`` → the kernel's blocked copy ``[out/4, in/16, 4, 16]`` (see cpu_kernel.cpp)."""
    out, inp = weight.shape
    return (
        weight.detach()
        .reshape(out // BLOCK_ROWS, BLOCK_ROWS, inp // CHUNK, CHUNK)
        .permute(0, 2, 1, 3)
        .contiguous()
    )


def skinny_mm(x, blocked):
    """``x [rows, in]`` (1–8 rows, float32) times the blocked weight → ``[rows, out]``."""
    import torch

    return torch.ops.tydust.skinny_mm(x, blocked)
