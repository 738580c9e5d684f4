"""One batch over many workers: every GPU of a machine, CPU processes, or a Ray cluster.

The scheduling, the worker processes and the transport are Ray's: each worker
is a Ray actor (:class:`TrackWorker`) that loads the model once and renders
whole tracks (all takes of a track, as one batch of variations) handed out from
one queue by :class:`RayScaleOut`. ``--workers N`` and ``--devices`` start a
private Ray on this machine for the run; ``--ray auto|local|HOST:PORT`` uses a
cluster (``local``: a private one here too).

What stays in this process (the driver): planning, so every seed, random ones
included, is fixed before dispatch and a take is the same whichever worker
renders it; ``--skip-existing``; the per-track locks; and every write into the
output folders. A worker renders into a private temporary folder and returns
the encoded, verified files and the provenance record as bytes; no shared file
system is needed. The driver checks each file's size and sha256 against what
the worker read back, verifies them again with the same staging folder and
atomic renames as a single-process run (:class:`~tydust_gen.export.staging.Staging`),
so every never-lose-a-take rule holds unchanged.

Faults: a worker that dies while rendering (killed, out of memory, its machine
gone) is restarted by Ray and the track goes back to the front of the queue, to
another worker when one is free, at most :data:`MAX_TRACK_RETRIES` more times.
A track that fails for its own reasons (a typed error in the pipeline) fails
once. On Ctrl-C the running tracks are cancelled, the workers are stopped and
nothing partial is written (exit 130). A cluster that cannot be reached is an
:class:`EnvironmentProblem` (exit 3) before any track renders.

Ray is an optional extra (``pip install 'tydust-gen[ray]'``) and is imported
only when a run asks for workers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

from tydust_gen.base import processes
from tydust_gen.base.errors import DeviceError, EnvironmentProblem, ExportError, ModelError, SettingsError, TydustError, UsageError
from tydust_gen.export.ffmpeg import Ffmpeg
from tydust_gen.export.staging import Staging, output_paths
from tydust_gen.export.verify import sha256_file
from tydust_gen.runs import provenance
from tydust_gen.runs.batch import RunListener, WorkerBoard, check_prompt_lengths, continued_in_batch, source_failed, warn_loudness
from tydust_gen.runs.pipeline import PREVIEW_SUFFIX, TrackPlan, TrackResult

MAX_TRACK_RETRIES = 2  # a track whose worker died is tried again at most this many times (3 tries in all)
POLL_S = 0.25  # s between looks at running tracks and worker progress
PROGRESS_EVERY_S = 0.25  # s between progress messages a worker sends
CANCEL_GRACE_S = 3.0  # s running tracks get to stop cleanly after Ctrl-C before their workers are killed
CONNECT_TIMEOUT_S = 5.0  # s to open a TCP connection to a cluster's address before calling it unreachable
CPU_CORES_PER_WORKER = 4  # default cores per CPU worker on a cluster when --workers is not given
WORKER_TMP = "tydust-gen-worker"  # folder under the worker's temp dir holding one private folder per track
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray binds a single-node cluster to 127.0.0.1
# Test hook: TRACK:STEP[@FILE] makes the worker rendering TRACK kill itself (SIGKILL) at generation step STEP,
# only once when FILE is given (whoever creates FILE first dies). See tests/test_distributed.py.
WORKER_DIES_ENV = "TYDUST_TEST_WORKER_DIES"
# Variables a job takes to workers on a cluster it did not start (a private cluster inherits all of ours).
# Paths are not sent: they name places on this machine.
FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TYDUST_CPU_KERNEL",
    "TYDUST_TEST_HOOK",
    "TYDUST_TEST_HOOK_GO",
    "TYDUST_TEST_HOOK_SLEEP",
    "TYDUST_TEST_FAULT",
    WORKER_DIES_ENV,
)
_ADDRESS_WORDS = ("auto", "local")


# --------------------------------------------------------------------------- what the user asked for


@dataclass(frozen=True)
class ScaleRequest:
    """How a batch is spread, as the CLI parsed it.

    Attributes:
        ray: ``--ray``: "auto" (a running cluster), "local" (start one here) or ``HOST:PORT``
            (``ray://HOST:PORT`` for Ray Client); None: a private Ray on this machine.
        workers: ``--workers``: how many workers (None: one per GPU, or one per
            :data:`CPU_CORES_PER_WORKER` cores).
        devices: ``--devices``: one worker per entry ("cpu" or "cuda:N"), on this machine.
        device_name: ``--device``: "auto", "cpu" or "cuda" for every worker.
        worker_logs: show what workers print here (Ray prints some of it on stdout, where ``--json``
            goes, so it is off unless asked for); otherwise it stays in Ray's log files.
    """

    ray: str | None = None
    workers: int | None = None
    devices: tuple[str, ...] = ()
    device_name: str = "auto"
    worker_logs: bool = False

    @property
    def private(self) -> bool:
        """Whether this run starts (and stops) its own Ray on this machine."""
        return self.ray in (None, "local")


def scale_request(
    *, ray: str | None, workers: str | None, devices: str | None, device_name: str = "auto", worker_logs: bool = False
) -> ScaleRequest | None:
    """Parse ``--ray``, ``--workers`` and ``--devices``; None when none was given (a single-process run).

    Raises:
        SettingsError, UsageError: a bad value or a combination that cannot work.
    """
    if ray is None and workers is None and devices is None:
        return None
    n = None
    if workers is not None:
        try:
            n = int(workers.strip())
        except ValueError:
            raise SettingsError(f"--workers must be a whole number, got {workers!r}; e.g. --workers 2") from None
        if n < 1:
            raise SettingsError(f"--workers must be at least 1, got {n}")
    address = None
    if ray is not None:
        address = ray.strip()
        if address.lower() in _ADDRESS_WORDS:
            address = address.lower()
        elif not address or _host_port(address) is None:
            raise SettingsError(f"--ray takes auto, local or HOST:PORT (e.g. --ray 10.0.0.5:6379), got {ray!r}")
    names: tuple[str, ...] = ()
    if devices is not None:
        names = tuple(d.strip().lower() for d in devices.split(","))
        for d in names:
            if d != "cpu" and not (d.startswith("cuda:") and d[5:].isdigit()):
                raise SettingsError(f"--devices takes cpu or cuda:N, comma-separated (e.g. cuda:0,cuda:1), got {d!r}")
        cudas = [d for d in names if d != "cpu"]
        if len(set(cudas)) != len(cudas):
            raise SettingsError(f"--devices names a GPU twice ({devices}); name each GPU once")
        if address not in (None, "local"):
            raise UsageError("--devices names GPUs of this machine; on a cluster use --workers N (one GPU each with --device cuda)")
        if device_name.strip().lower() != "auto":
            raise UsageError("pass --device or --devices, not both")
        if n is not None and n != len(names):
            raise UsageError(f"--workers {n} disagrees with the {len(names)} device(s) of --devices; drop --workers")
        n = len(names)
    choice = device_name.strip().lower()
    if choice.startswith("cuda:"):
        raise UsageError("--device cuda:N picks one GPU; with workers use --device cuda (one GPU each) or --devices cuda:0,cuda:1")
    if choice not in ("auto", "cpu", "cuda"):
        raise SettingsError(f"unknown device {device_name!r}; use auto, cuda or cpu")
    return ScaleRequest(ray=address, workers=n, devices=names, device_name=choice, worker_logs=worker_logs)


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------- the worker side (inside Ray actors)


@dataclass(frozen=True)
class WorkerSlot:
    """One worker to start: its label, device kind and the Ray resources it holds."""

    label: str
    device: str  # "cpu" or "cuda" (Ray picks the GPU and hides the others)
    num_cpus: int
    num_gpus: int


@dataclass
class WorkerInfo:
    """What a started worker says about itself (or why it could not start)."""

    label: str
    host: str = ""
    pid: int = 0
    device: str = ""
    load_s: float = 0.0
    identity: dict[str, Any] | None = None
    note: str | None = None  # a warning for the user (e.g. the CPU kernel is not in use)
    error: TydustError | None = None


@dataclass
class RenderedTake:
    """One take as a worker returns it.

    Attributes:
        result: the take's result; its file paths point into the worker's private folder.
        files: ``{file name: content}``: ``TAKE.mp3``, ``TAKE.ogg``, ``TAKE.json`` (and ``TAKE.png``).
    """

    result: TrackResult
    files: dict[str, bytes]


@dataclass
class Rendered:
    """A track as a worker returns it: all its takes, or the one-line error of a failed track."""

    track: str
    takes: list[RenderedTake] = field(default_factory=list)
    error: str | None = None


class ProgressBoard:
    """A Ray actor where workers leave their latest progress and the driver reads it."""

    def __init__(self) -> None:
        self.state: dict[str, tuple[str, int | None, int | None]] = {}

    def update(self, label: str, text: str, done: int | None = None, total: int | None = None) -> None:
        self.state[label] = (text, done, total)

    def snapshot(self) -> dict[str, tuple[str, int | None, int | None]]:
        return dict(self.state)


class Cancelled(Exception):
    """The driver cancelled the running track (Ctrl-C)."""


class TrackWorker:
    """A Ray actor holding the model: renders whole planned tracks into a private folder and returns bytes.

    Errors while starting (no ffmpeg, no model, bad device) are kept and
    returned by :meth:`ready`, so the driver gets the typed error and its
    one-line message rather than an actor that failed to start.
    """

    def __init__(self, label: str, model_ref: str, device: str, threads: int, backends: list[str], board: str) -> None:
        import ray

        self.label = label
        # By name: a handle passed as an argument would live in the object store, and Ray cannot promise to
        # still have it when it restarts this worker after a crash.
        self.board = ray.get_actor(board)
        self.info = WorkerInfo(label=label, host=socket.gethostname(), pid=os.getpid())
        self.backends: dict[str, Any] = {}
        _sweep_private_folders()
        try:
            self._start(model_ref, device, threads, backends)
        except TydustError as exc:
            self.info.error = exc

    def _start(self, model_ref: str, device: str, threads: int, backends: list[str]) -> None:
        import torch

        from tydust_gen.export.ffmpeg import check_encoders, find_ffmpeg
        from tydust_gen.model import loading

        if device == "cpu":
            torch.set_num_threads(max(1, threads))
        self.ffmpeg = find_ffmpeg()
        check_encoders(self.ffmpeg)
        source = loading.resolve_source(model_ref)
        dev, _ = loading.resolve_device(device)
        started = time.perf_counter()
        self.loaded = loading.load_model(source, dev)
        self.info.load_s = time.perf_counter() - started
        self.info.device = str(self.loaded.device)
        self.info.identity = provenance.model_identity(source)
        if self.loaded.device.type == "cpu" and "fast" in backends:
            from tydust_gen.model import cpu_kernel

            state = cpu_kernel.load()
            if not state.available and not cpu_kernel.turned_off():
                self.info.note = f"CPU decode kernel not in use on {self.info.host} ({state.detail}); decoding on MKL instead"

    def ready(self) -> WorkerInfo:
        return self.info

    def check_prompts(self, plans: list[TrackPlan]) -> TydustError | None:
        try:
            check_prompt_lengths(self.loaded, plans)
        except TydustError as exc:
            return exc
        return None

    def render(self, plan: TrackPlan) -> Rendered:
        """Render every take of ``plan`` into a private folder; return the files and records as bytes."""
        from tydust_gen.model.backends import make_backend
        from tydust_gen.runs.pipeline import render_takes

        name = plan.spec.name
        folder = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=_private_root()))
        try:
            here = replace(plan, out_dir=folder, outputs=output_paths(folder, plan.takes[0]))
            backend = self.backends.setdefault(
                plan.settings.backend, make_backend(plan.settings.backend, self_check=True)
            )
            try:
                takes = render_takes(
                    self.loaded, here, ffmpeg=self.ffmpeg, backend=backend, progress=self._progress(name),
                    stage=lambda what: self.board.update.remote(self.label, f"{name}: {what}"),
                    overwrite=True, record_model=self.info.identity,
                )  # fmt: skip
            except TydustError as exc:
                return Rendered(name, error=str(exc))
            out = []
            for r in takes:
                names = [f.path.name for f in r.files] + [provenance.record_path(folder, r.name).name]
                if r.preview is not None:
                    names.append(r.preview.name)
                out.append(RenderedTake(r, {n: (folder / n).read_bytes() for n in names}))
            return Rendered(name, takes=out)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _progress(self, track: str):
        import ray

        context = ray.get_runtime_context()
        last = [0.0]

        def progress(done: int, total: int) -> None:
            if context.is_canceled():
                raise Cancelled(track)
            _maybe_die(track, done)
            now = time.monotonic()
            if now - last[0] >= PROGRESS_EVERY_S or done == total:
                last[0] = now
                self.board.update.remote(self.label, f"{track}: generating", done, total)

        return progress


def _private_root() -> Path:
    root = Path(tempfile.gettempdir()) / WORKER_TMP
    root.mkdir(parents=True, exist_ok=True)
    return root


def _sweep_private_folders() -> None:
    """Remove private folders left by workers that were killed (their pid, the name's first part, is gone)."""
    root = Path(tempfile.gettempdir()) / WORKER_TMP
    if not root.is_dir():
        return
    for folder in root.iterdir():
        pid = folder.name.split("-", 1)[0]
        if pid.isdigit() and not processes.is_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _maybe_die(track: str, step: int) -> None:
    """The :data:`WORKER_DIES_ENV` test hook: a real SIGKILL of this worker in the middle of a track."""
    want = os.environ.get(WORKER_DIES_ENV)
    if not want:
        return
    target, _, once = want.partition("@")
    name, _, at = target.rpartition(":")
    if name != track or str(step) != at:
        return
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    processes.kill_self_now()


# --------------------------------------------------------------------------- the driver side


def _quiet_ray_stdout(ray, worker_logs: bool) -> None:
    """Keep Ray's own messages off stdout unless the user asked for the workers' output.

    Whatever ``log_to_driver`` says, a Ray driver runs a thread that prints cluster errors (for example
    "... so the task will be retried") on *stdout*, where they break ``--json``. Ray's debugger turns the
    same printer off through this module flag; our listener already reports retries and failures.
    """
    worker_module = getattr(getattr(ray, "_private", None), "worker", None)
    if worker_module is not None and hasattr(worker_module, "_worker_logs_enabled"):
        worker_module._worker_logs_enabled = worker_logs


def _import_ray(private: bool):
    if private and "ray" not in __import__("sys").modules:
        # A cluster started for one run serves this machine only: Ray then uses 127.0.0.1 instead of the
        # machine's network address (read when ray is imported, and inherited by the processes it starts).
        os.environ.setdefault(LOCAL_ONLY_ENV, "0")
    try:
        import ray
    except ImportError:
        raise EnvironmentProblem(
            "--workers, --devices and --ray need Ray, which is not installed; pip install 'tydust-gen[ray]'"
        ) from None
    return ray


def _probe(address: str) -> None:
    """Fail in seconds, not after Ray's long reconnect loop, when nothing listens at ``address``."""
    host_port = _host_port(address)
    assert host_port is not None
    try:
        with socket.create_connection(host_port, timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise EnvironmentProblem(
            f"cannot reach the Ray cluster at {address} ({why}); start it with `ray start --head` there, "
            f"or check the address and port"
        ) from None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


@contextlib.contextmanager
def _visible_gpus(devices: tuple[str, ...]) -> Iterator[int]:
    """Show a private Ray only the GPUs of ``--devices`` (it reads CUDA_VISIBLE_DEVICES when it starts)."""
    indices = [int(d[5:]) for d in devices if d != "cpu"]
    if not indices:
        yield 0
        return
    import torch

    count = torch.cuda.device_count()
    missing = [i for i in indices if i >= count]
    if missing:
        raise DeviceError(f"cuda:{missing[0]} does not exist: this machine has {count} CUDA device(s)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = visible.split(",") if visible else [str(i) for i in range(count)]
    saved = visible
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(physical[i] for i in indices)
    try:
        yield len(indices)
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def _death_reason(exc: BaseException) -> str:
    import ray.exceptions as rex

    if isinstance(exc, rex.OutOfMemoryError):
        return "out of memory"
    if isinstance(exc, rex.NodeDiedError):
        return "its machine left the cluster"
    if isinstance(exc, rex.ObjectLostError):
        return "its result was lost"
    return "its process ended"


class RayScaleOut:
    """Renders a batch's locked tracks on Ray workers (:class:`~tydust_gen.runs.batch.ScaleOut`)."""

    def __init__(self, request: ScaleRequest, model_ref: str):
        self.request = request
        self.model_ref = model_ref

    # -- connecting

    def _connect(self, ray, listener: RunListener) -> bool:
        """Join or start the cluster; True when this run started it (and must stop it)."""
        r = self.request
        if r.ray not in (None, *_ADDRESS_WORDS):
            _probe(r.ray)
        if ray.is_initialized():
            # e.g. a program (or a test) that drives Ray itself and calls run_batch: use its cluster
            current = ray.get_runtime_context().gcs_address
            if r.ray in (None, *_ADDRESS_WORDS) or _host_port(r.ray) == _host_port(current):
                # its Ray printer too would write a retried task's message on stdout, in the middle of
                # (or after) --json; it stays off afterwards, as a message can come after the run ends
                _quiet_ray_stdout(ray, r.worker_logs)
                return False
            raise UsageError(f"this process is already connected to the Ray cluster at {current}; pass --ray auto to use it")
        options: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": r.worker_logs, "include_dashboard": False}
        old_term = signal.getsignal(signal.SIGTERM)
        try:
            if r.private:
                cpu_workers = sum(d == "cpu" for d in r.devices) if r.devices else (r.workers or 1)
                with _visible_gpus(r.devices) as gpus:
                    if r.devices:
                        options["num_gpus"] = gpus
                    listener.info(f"starting Ray on this machine ({_cores()} cores)…")
                    ray.init(num_cpus=max(_cores(), cpu_workers), **options)
            else:
                listener.info(f"connecting to the Ray cluster at {r.ray}…")
                ray.init(address=r.ray, **options)
        except TydustError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray raises many types; its message travels in ours
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            where = "start Ray on this machine" if r.private else f"connect to the Ray cluster at {r.ray}"
            hint = "" if r.private else "; start one with `ray start --head`, or check the address"
            raise EnvironmentProblem(f"could not {where} ({first}){hint}") from None
        finally:
            # ray.init installs a SIGTERM handler that exits at once; ours turns SIGTERM into a clean stop
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, old_term)
        _quiet_ray_stdout(ray, r.worker_logs)
        return True

    def _slots(self, ray, plans: list[TrackPlan]) -> list[WorkerSlot]:
        r = self.request
        if r.devices:
            cpu_workers = sum(d == "cpu" for d in r.devices)
            share = max(1, _cores() // max(1, cpu_workers))
            slots = [
                WorkerSlot(f"w{i}", "cpu", share, 0) if d == "cpu" else WorkerSlot(f"w{i}", "cuda", 1, 1)
                for i, d in enumerate(r.devices, start=1)
            ]
        else:
            resources = ray.cluster_resources()
            gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
            gpu = r.device_name == "cuda" or (r.device_name == "auto" and gpus > 0)
            if gpu:
                if gpus == 0:
                    raise DeviceError("--device cuda was asked for but the Ray cluster has no GPU; use --device cpu or auto")
                n = r.workers or gpus
                if n > gpus:
                    raise DeviceError(f"{n} GPU workers were asked for but the Ray cluster has {gpus} GPU(s); pass --workers {gpus}")
                slots = [WorkerSlot(f"w{i}", "cuda", 1, 1) for i in range(1, n + 1)]
            else:
                node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
                biggest = max(node_cpus, default=cpus)
                n = r.workers or max(1, cpus // CPU_CORES_PER_WORKER)
                if n > cpus:
                    raise EnvironmentProblem(f"{n} CPU workers were asked for but the Ray cluster has {cpus} CPU(s); pass --workers {cpus}")
                share = max(1, min(cpus // n, biggest))
                slots = [WorkerSlot(f"w{i}", "cpu", share, 0) for i in range(1, n + 1)]
        if any(s.device == "cuda" for s in slots) and any(p.settings.backend == "fast-int8" for p in plans):
            raise DeviceError("--backend fast-int8 runs on the CPU only; use --backend fast on a GPU, or --device cpu")
        return slots

    # -- rendering

    def render(
        self,
        plans: list[TrackPlan],
        *,
        source: Any,
        identity: dict[str, Any],
        ffmpeg: Ffmpeg,
        force: bool,
        listener: RunListener,
    ) -> tuple[list[TrackResult], str, float]:
        """Start the workers, render every plan on them and write each finished take here.

        Raises:
            EnvironmentProblem: Ray missing, the cluster unreachable, a worker without ffmpeg or the model.
            ModelError: a worker has other weights than this machine.
            UsageError: a prompt the text encoder would truncate.
        """
        from tydust_gen.base import faults

        ray = _import_ray(self.request.private)
        plans = [_absolute_inputs(p) for p in plans]  # workers run in other folders
        owned = self._connect(ray, listener)
        actors: list[Any] = []
        board = None
        running: dict[Any, tuple[int, int]] = {}
        try:
            slots = self._slots(ray, plans)
            faults.hook("loading")
            env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
            runtime_env = {"env_vars": env} if env else None
            backends = sorted({p.settings.backend for p in plans})
            board_name = f"tydust-progress-{uuid.uuid4().hex}"
            board = ray.remote(num_cpus=0)(ProgressBoard).options(name=board_name).remote()
            worker_class = ray.remote(TrackWorker)
            listener.info(f"loading {self.model_ref} on {len(slots)} worker(s)…")
            for s in slots:
                actors.append(
                    worker_class.options(
                        num_cpus=s.num_cpus, num_gpus=s.num_gpus, max_restarts=-1, max_task_retries=0, runtime_env=runtime_env
                    ).remote(s.label, self.model_ref, s.device, s.num_cpus, backends, board_name)
                )
            infos = self._ready(ray, actors, slots, identity, listener)
            problem = _wait(ray, actors[0].check_prompts.remote(plans))
            if problem is not None:
                raise problem
            results = self._dispatch(ray, actors, infos, board, plans, running, ffmpeg=ffmpeg, force=force, listener=listener)
        finally:
            self._stop(ray, actors, board, running, owned)
        kinds = sorted({i.device.split(":")[0] for i in infos})
        device = f"ray: {len(infos)} × {'/'.join(kinds)}"
        return results, device, max((i.load_s for i in infos), default=0.0)

    def _ready(self, ray, actors, slots, identity, listener: RunListener) -> list[WorkerInfo]:
        infos = []
        for actor, slot in zip(actors, slots):
            try:
                info: WorkerInfo = _wait(ray, actor.ready.remote())
            except ray.exceptions.RayError as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                raise EnvironmentProblem(f"worker {slot.label} did not start ({first}); check the Ray logs of its machine") from None
            if info.error is not None:
                raise info.error
            if not provenance.same_model(identity, info.identity or {}):
                raise ModelError(
                    f"worker {slot.label} on {info.host} has other weights for {self.model_ref} than this machine; "
                    f"put the same snapshot on every machine of the cluster"
                )
            listener.info(f"worker {slot.label}: {info.device} on {info.host} (pid {info.pid}), model loaded in {info.load_s:.1f} s")
            if info.note:
                listener.warn(info.note)
            infos.append(info)
        return infos

    def _dispatch(self, ray, actors, infos, board, plans, running, *, ffmpeg: Ffmpeg, force: bool, listener: RunListener):
        """Hand tracks out from one queue to idle workers; retry a track whose worker died; write what comes back.

        A worker that died is restarted by Ray (``max_restarts``) and gets work
        again only once it answers :meth:`TrackWorker.ready`: a call sent to it
        while it restarts would fail at once and waste a try of another track.
        """
        faults = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError,
                  ray.exceptions.OutOfMemoryError, ray.exceptions.NodeDiedError)  # fmt: skip
        queue = list(range(len(plans)))
        sources = continued_in_batch(plans)  # a continuation waits until the track it continues is written
        tries = [0] * len(plans)
        died_on: dict[int, set[int]] = {}
        idle = list(range(len(actors)))
        restarting: dict[Any, int] = {}  # ready() call → worker
        results: dict[int, list[TrackResult]] = {}
        labels = [i.label for i in infos]
        with listener.workers(labels, len(plans)) as progress:
            progress.batch(0, len(plans))
            while queue or running:
                while queue and idle:
                    startable = [i for i in queue if sources.get(i) is None or sources[i] in results]
                    if not startable:
                        break
                    index = startable[0]
                    queue.remove(index)
                    src = sources.get(index)
                    failed = None if src is None else source_failed(plans[index], plans[src], results[src])
                    if failed is not None:
                        listener.track_failed(plans[index].spec.name, failed.error)
                        results[index] = [failed]
                        progress.batch(len(results), len(plans))
                        continue
                    # another worker than the one(s) that died on this track, when one is free
                    fresh = [a for a in idle if a not in died_on.get(index, ())]
                    worker = (fresh or idle)[0]
                    idle.remove(worker)
                    tries[index] += 1
                    running[actors[worker].render.remote(plans[index])] = (index, worker)
                    progress.worker(labels[worker], f"{plans[index].spec.name}: starting")
                if queue and not (running or restarting):
                    for index in queue:  # every worker is gone for good
                        results[index] = self._write(plans[index], Rendered(plans[index].spec.name, error=(
                            "no worker is left to render it (they could not restart); see the warnings above")),
                            None, tries[index], ffmpeg=ffmpeg, force=force, listener=listener)  # fmt: skip
                    queue.clear()
                    break
                done, _ = ray.wait([*running, *restarting], num_returns=1, timeout=POLL_S)
                _show(ray, board, progress)
                for ref in done:
                    if ref in restarting:
                        worker = restarting.pop(ref)
                        try:
                            info: WorkerInfo = ray.get(ref)
                        except faults:
                            listener.warn(f"worker {labels[worker]} could not be restarted; going on without it")
                            continue
                        if info.error is not None:
                            listener.warn(f"worker {labels[worker]} could not be restarted ({info.error}); going on without it")
                            continue
                        infos[worker] = info
                        idle.append(worker)
                        progress.worker(labels[worker], "idle")
                        continue
                    index, worker = running.pop(ref)
                    plan = plans[index]
                    try:
                        rendered: Rendered = ray.get(ref)
                    except faults as exc:
                        restarting[actors[worker].ready.options(max_task_retries=-1).remote()] = worker
                        progress.worker(labels[worker], "restarting")
                        died_on.setdefault(index, set()).add(worker)
                        reason = _death_reason(exc)
                        if tries[index] <= MAX_TRACK_RETRIES:
                            listener.warn(
                                f"{plan.spec.name}: worker {labels[worker]} died ({reason}); trying again on another worker "
                                f"(try {tries[index] + 1} of {MAX_TRACK_RETRIES + 1})"
                            )
                            queue.insert(0, index)
                            continue
                        rendered = Rendered(
                            plan.spec.name,
                            error=f"the worker rendering it died {tries[index]} times (last: {reason}); "
                            f"it may need more memory than a worker has",
                        )
                    else:
                        idle.append(worker)
                        progress.worker(labels[worker], "idle")
                    results[index] = self._write(plan, rendered, infos[worker], tries[index], ffmpeg=ffmpeg, force=force, listener=listener)
                    progress.batch(len(results), len(plans))
        return [r for index in range(len(plans)) for r in results[index]]

    def _write(self, plan: TrackPlan, rendered: Rendered, info: WorkerInfo | None, tries: int, *, ffmpeg, force, listener) -> list[TrackResult]:
        """Publish a rendered track here; a failed one becomes one failed result, as in a single-process run."""
        name = plan.spec.name
        try:
            if rendered.error is not None:
                raise _TrackFailed(rendered.error)
            assert info is not None
            worker = {"label": info.label, "host": info.host, "tries": tries}
            takes = [publish_take(plan, take, ffmpeg=ffmpeg, force=force, worker=worker) for take in rendered.takes]
        except (TydustError, _TrackFailed) as exc:
            listener.track_failed(name, str(exc))
            return [TrackResult(name=name, settings=plan.settings, seed_was_random=plan.seed_was_random, error=str(exc))]
        warn_loudness(takes, listener)
        return takes

    def _stop(self, ray, actors, board, running, owned: bool) -> None:
        """Cancel running tracks (they stop at their next step), then stop every worker; stop Ray if this run started it."""
        try:
            if running:
                for ref in running:
                    with contextlib.suppress(Exception):
                        ray.cancel(ref)
                with contextlib.suppress(Exception):
                    ray.wait(list(running), num_returns=len(running), timeout=CANCEL_GRACE_S)
        finally:
            for actor in [*actors, *([board] if board is not None else [])]:
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
            if owned:
                with contextlib.suppress(Exception):
                    ray.shutdown()


class _TrackFailed(Exception):
    """A worker's one-line error for a track that failed for its own reasons."""


def _absolute_inputs(plan: TrackPlan) -> TrackPlan:
    """``plan`` with the audio files it reads (continued audio, melody) named by absolute path.

    A worker's working folder is not the driver's, so a relative path (``out/phase3_combat.ogg``)
    would name another file or none there.
    """
    if plan.continuation is not None:
        plan = replace(plan, continuation=replace(plan.continuation, path=plan.continuation.path.absolute()))
    if plan.melody is not None:
        plan = replace(plan, melody=replace(plan.melody, path=plan.melody.path.absolute()))
    return plan


def _wait(ray, ref):
    """``ray.get`` in short waits, so Ctrl-C is acted on at once."""
    while True:
        done, _ = ray.wait([ref], timeout=POLL_S)
        if done:
            return ray.get(ref)


def _show(ray, board, progress: WorkerBoard) -> None:
    with contextlib.suppress(Exception):
        for label, (text, done, total) in ray.get(board.snapshot.remote(), timeout=POLL_S * 4).items():
            progress.worker(label, text, done, total)


def publish_take(plan: TrackPlan, take: RenderedTake, *, ffmpeg: Ffmpeg, force: bool, worker: dict[str, Any]) -> TrackResult:
    """Write one take a worker returned into ``plan.out_dir``: staged, checked, verified, then moved into place.

    The files must arrive as the worker read them back (size and sha256); then
    :meth:`Staging.publish` verifies them as for a take rendered here and moves
    them into place, the provenance record last.

    Raises:
        ExportError: a file arrived damaged, is not as promised, or could not be written.
        UsageError: an output appeared meanwhile and ``force`` is False.
    """
    r = take.result
    claimed = {f.format: f for f in r.files}
    with Staging(plan.out_dir, r.name, ffmpeg=ffmpeg) as staging:
        for fmt in ("mp3", "ogg"):
            staged = _write_bytes(staging.staged(fmt), take.files[f"{r.name}.{fmt}"])
            if staged.stat().st_size != claimed[fmt].size_bytes or sha256_file(staged) != claimed[fmt].sha256:
                raise ExportError(f"{staged.name} arrived from worker {worker['label']} damaged (its sha256 differs); run the track again")
        preview = None
        png = f"{r.name}{PREVIEW_SUFFIX}"
        if png in take.files:
            _write_bytes(staging.add_extra(png), take.files[png])
            preview = plan.out_dir / png
        record = json.loads(take.files[provenance.record_path(plan.out_dir, r.name).name])

        def sidecar(files) -> dict[str, bytes]:
            # The worker wrote the record; what it cannot know is this machine's: the prompt file it was
            # planned from, the files as verified here, and the preview's final place.
            spec = plan.spec
            record["prompt"]["file"] = str(spec.path)
            record["prompt"]["file_sha256"] = sha256_file(spec.path) if spec.path.is_file() else None
            record["files"] = [{**provenance.to_jsonable(f), "path": f.path.name} for f in files]
            if preview is not None:
                record["result"]["preview"] = str(preview)
            record["worker"] = worker
            return {provenance.record_path(plan.out_dir, r.name).name: provenance.record_bytes(record)}

        try:
            files = staging.publish(plan.settings.duration_s, overwrite=force, sidecar=sidecar)
        except FileExistsError as exc:
            raise UsageError(f"{exc.args[0]} appeared while generating; pass --force to replace it") from None
    return replace(r, files=files, preview=preview)


def _write_bytes(path: Path, content: bytes) -> Path:
    try:
        with open(path, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise ExportError(f"could not write {path.name}: {exc.strerror or exc}") from exc
    return path
