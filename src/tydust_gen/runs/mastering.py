"""``master FILE...``: the stages after the model, for audio that already exists.

Any file ffmpeg reads (WAV, FLAC, MP3, OGG, M4A...) goes through what a
generated take goes through after MusicGen: 44.1 kHz stereo (the same
high-quality resampler) → DC removal → a loop on the bar (or by length when the
music has no clear beat) or fades → loudness and true peak checked on the
encoded files → MP3 192k + OGG q6 with tags (and loop tags) → ``NAME.json``
record → optional ``NAME.png`` preview, for ``NAME.ext`` into the output folder.

Safety as for ``generate``: every file is decoded, checked and (in loop mode)
beat-tracked before anything is written, so a bad file, a silent one or a loop
that cannot fit fails in seconds with exit 2; outputs that exist are refused
without ``force``; each name is locked (exit 4 when another tydust-gen writes
it); files are built in a staging folder and appear whole or not at all. A file
that fails after those checks is reported and the others go on (exit 1).

The record is ``{"format": "tydust-gen/master"}``, not a generation record:
``regenerate`` refuses it (there is no prompt or seed to repeat).
"""

from __future__ import annotations

import datetime as _dt
import os
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tydust_gen.audio import loop as loop_stage
from tydust_gen.audio import master as master_stage
from tydust_gen.audio import resample as audio
from tydust_gen.base.errors import SettingsError, TydustError, UsageError
from tydust_gen.base.settings import MasteringSettings, beats_per_bar, parse_bpm, parse_duration, resolve_mastering
from tydust_gen.base.waveform import Waveform
from tydust_gen.export import staging as export
from tydust_gen.export.encode import FFMPEG_TIMEOUT_S
from tydust_gen.export.ffmpeg import Ffmpeg, check_encoders, find_ffmpeg
from tydust_gen.export.loudness import EncodedPeaks, MeasuredFile, master_for_encoding
from tydust_gen.export.tags import TrackTags, write_loop_tags
from tydust_gen.export.verify import sha256_file
from tydust_gen.runs import provenance
from tydust_gen.runs.batch import RunListener
from tydust_gen.runs.pipeline import DEFAULT_OUTPUT_ROOT, PREVIEW_SUFFIX, TrackResult, _loudness_figures, _num, _tensor

RECORD_FORMAT = "tydust-gen/master"
RECORD_VERSION = 1
SILENT_PEAK_DBFS = -90.0  # dBFS; a file whose every sample is below this has nothing to master
MIN_PLAIN_LOOP_S = 2.0  # s; the shortest loop by length (as for generate --loop)
_WAVE_FLOAT = 3  # WAVE_FORMAT_IEEE_FLOAT
_WAVE_EXTENSIBLE = 0xFFFE


@dataclass(frozen=True)
class SourceAudio:
    """An input file as ffmpeg decoded it.

    Attributes:
        path: the file.
        sample_rate: its sample rate, Hz.
        channels: channels decoded (2: ffmpeg mixes mono up and surround down).
        duration_s: seconds.
        peak_dbfs: largest absolute sample, dBFS.
        sha256: of the file's bytes.
        size_bytes: file size.
        decoded_rate: the rate it was decoded at: its own, or 48 kHz when ffmpeg converted it
            (:func:`read_audio`).
    """

    path: Path
    sample_rate: int
    channels: int
    duration_s: float
    peak_dbfs: float
    sha256: str
    size_bytes: int
    decoded_rate: int = 0


@dataclass(frozen=True)
class MasterPlan:
    """One input file whose checks passed.

    Attributes:
        source: the decoded file's facts.
        name: output base name (the file's stem).
        out_dir: destination folder.
        mastering: loudness, fades, loop, bars, meter, preview.
        duration_s: trim the output to this many seconds (no loop), or the loop's target (loop); None: the whole file.
        bpm_prior: the tempo given with ``--bpm`` (prior of the beat tracker, and the BPM tag), or None.
        grid: the beat grid found while planning a loop (None without ``--loop``).
    """

    source: SourceAudio
    name: str
    out_dir: Path
    mastering: MasteringSettings
    duration_s: float | None
    bpm_prior: float | None
    grid: Any = None


@dataclass(frozen=True)
class MasterRequest:
    """One ``master`` command, as the CLI parsed it.

    Attributes:
        files: input audio files.
        cli_settings: option values as typed (strings, None when not given): ``duration``,
            ``loudness``, ``true_peak``, ``fade_in``, ``fade_out``, ``loop``, ``bars``,
            ``meter``, ``preview``, ``bpm``.
        out_dir: output folder (None: ``assets/music/``).
        force: replace existing outputs.
    """

    files: list[Path]
    cli_settings: Mapping[str, Any]
    out_dir: Path | None = None
    force: bool = False


@dataclass
class MasterBatch:
    """What a ``master`` command did: one result per file, in order, and the seconds it took."""

    plans: list[MasterPlan]
    results: list[TrackResult] = field(default_factory=list)
    total_s: float = 0.0

    @property
    def failed(self) -> list[TrackResult]:
        return [r for r in self.results if not r.ok]


def _parse_wav(data: bytes, path: Path) -> tuple[np.ndarray, int]:
    """float32 ``[C, N]`` and the rate from the WAV ffmpeg streamed (32-bit float; sizes may be unset on a pipe)."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise UsageError(f"{path}: ffmpeg did not return audio for it; pass an audio file")
    pos, channels, rate, fmt = 12, 0, 0, 0
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = pos + 8
        if chunk == b"fmt ":
            fmt, channels, rate = struct.unpack("<HHI", data[body : body + 8])
        elif chunk == b"data":
            end = len(data) if size == 0xFFFFFFFF or body + size > len(data) else body + size
            if fmt not in (_WAVE_FLOAT, _WAVE_EXTENSIBLE) or channels < 1 or rate < 1:
                raise UsageError(f"{path}: ffmpeg returned audio in an unexpected layout; pass another file")
            samples = np.frombuffer(data[body : end - (end - body) % (4 * channels)], dtype="<f4")
            return np.ascontiguousarray(samples.reshape(-1, channels).T), rate
        pos = body + size + (size & 1)
    raise UsageError(f"{path}: ffmpeg found no audio samples in it; pass an audio file")


FALLBACK_DECODE_RATE = 48_000  # Hz; what ffmpeg converts a file to when our resampler cannot take its rate


def read_audio(ffmpeg: Ffmpeg, path: Path) -> tuple[np.ndarray, int, int]:
    """Decode the first audio stream of any file ffmpeg reads to float32 stereo ``[2, N]``.

    At the file's own rate, unless the generator's resampler cannot take that rate in bounded memory
    (:func:`~tydust_gen.audio.resample.filter_bank_bytes`: rates sharing few factors with 44.1 kHz,
    such as 44,099 Hz or 44,056 Hz): such a file is decoded again at 48 kHz by ffmpeg's own resampler.

    Returns:
        ``(samples, their rate, the file's rate)``.

    Raises:
        UsageError: the file is missing, unreadable, or has no audio stream (ffmpeg's reason included).
    """
    if not path.is_file():
        raise UsageError(f"{path} does not exist or is not a file; pass an audio file")
    samples, rate = _decode(ffmpeg, path, None)
    if audio.filter_bank_bytes(rate, audio.TARGET_SAMPLE_RATE) <= audio.RESAMPLE_BANK_LIMIT_BYTES:
        return samples, rate, rate
    del samples
    samples, decoded = _decode(ffmpeg, path, FALLBACK_DECODE_RATE)
    return samples, decoded, rate


def _decode(ffmpeg: Ffmpeg, path: Path, rate: int | None) -> tuple[np.ndarray, int]:
    cmd = [
        ffmpeg.path, "-nostdin", "-hide_banner", "-v", "error", "-i", os.fspath(path), "-map", "0:a:0",
        "-ac", str(audio.TARGET_CHANNELS), *(["-ar", str(rate)] if rate else []), "-f", "wav", "-acodec", "pcm_f32le", "-",
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, timeout=FFMPEG_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise UsageError(f"{path}: ffmpeg could not be run to read it ({exc})") from None
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        reason = lines[-1] if lines else f"ffmpeg exit {proc.returncode}"
        raise UsageError(f"{path}: ffmpeg cannot read it as audio ({reason}); pass an audio file")
    return _parse_wav(proc.stdout, path)


def _source_facts(path: Path, samples: np.ndarray, rate: int, file_rate: int) -> SourceAudio:
    peak = float(np.max(np.abs(samples))) if samples.size else 0.0
    peak_dbfs = 20.0 * np.log10(peak) if peak > 0 else -np.inf
    if peak_dbfs < SILENT_PEAK_DBFS:
        raise UsageError(f"{path} is silent (peak below {SILENT_PEAK_DBFS:g} dBFS); there is nothing to master")
    return SourceAudio(path, file_rate, samples.shape[0], samples.shape[1] / rate, peak_dbfs, sha256_file(path),
                       path.stat().st_size, decoded_rate=rate)  # fmt: skip


def _to_44k1(samples: np.ndarray, rate: int) -> np.ndarray:
    """Stereo float32 at 44.1 kHz, with the generator's resampler."""
    import torch

    wave = audio.resample(Waveform(torch.from_numpy(np.ascontiguousarray(samples)), rate))
    return wave.samples.numpy()


def _prepare(plan: MasterPlan, x: np.ndarray) -> np.ndarray:
    """Trimmed (no loop: to ``duration_s``) and DC-free audio of a planned file, from its 44.1 kHz audio ``x``."""
    if plan.duration_s is not None and not plan.mastering.loop:
        x = x[:, : int(round(plan.duration_s * audio.TARGET_SAMPLE_RATE))]
    return master_stage.remove_dc(x, audio.TARGET_SAMPLE_RATE)


def _loop_target_s(plan: MasterPlan, total_s: float, *, on_the_bar: bool) -> float:
    """Seconds the loop aims at: ``--duration``, else as much of the file as a loop can use.

    A loop on the bar then takes the most whole bars that fit; a loop by length
    leaves :data:`~tydust_gen.audio.loop.DEFAULT_LOOP_OVERRUN_S` for its search and crossfade.
    """
    if plan.duration_s is not None:
        return plan.duration_s
    return total_s if on_the_bar else total_s - loop_stage.DEFAULT_LOOP_OVERRUN_S


def plan_file(path: Path, request: MasterRequest, ffmpeg: Ffmpeg) -> MasterPlan:
    """Every check of one input that can be made before writing anything (decodes, and tracks the beat for a loop).

    Raises:
        UsageError: unreadable or silent file, bad option, outputs in the way, a loop that cannot fit.
        OutputDirError: the output folder cannot be written.
    """
    cli = request.cli_settings
    samples, rate, file_rate = read_audio(ffmpeg, path)
    source = _source_facts(path, samples, rate, file_rate)
    duration = parse_duration(cli["duration"]) if cli.get("duration") is not None else None
    bpm = parse_bpm(cli["bpm"]) if cli.get("bpm") is not None else None
    mastering = resolve_mastering(cli, {}, duration if duration is not None else source.duration_s)
    if mastering.variations != 1:
        raise SettingsError("master makes one take per file; drop --variations")
    if duration is not None and not mastering.loop and duration > source.duration_s + 1e-6:
        raise UsageError(f"--duration {duration:g} is longer than {path} ({source.duration_s:.2f} s); shorten it or drop it")
    name = path.stem
    dest = request.out_dir if request.out_dir is not None else DEFAULT_OUTPUT_ROOT
    export.check_output_dir(dest)
    outputs = [*export.output_paths(dest, name).values(), provenance.record_path(dest, name)]
    if mastering.preview:
        outputs.append(dest / f"{name}{PREVIEW_SUFFIX}")
    for out in outputs:
        if out.exists() and out.resolve() == path.resolve():
            raise UsageError(f"{path} would be replaced by its own master; pick another --out-dir")
    if not request.force:
        existing = [p for p in outputs if p.exists()]
        if existing:
            raise UsageError(f"{existing[0]} already exists; pass --force to replace it")
    plan = MasterPlan(source, name, dest, mastering, duration, bpm)
    if mastering.loop:
        # Track the beat and fit the loop now: a loop that cannot fit is refused before anything is written.
        x = _prepare(plan, _to_44k1(samples, rate))
        plan = _fit_loop(plan, x)
    return plan


def _fit_loop(plan: MasterPlan, x: np.ndarray) -> MasterPlan:
    """Detect the beat of prepared audio and check the loop fits; the plan keeps the grid."""
    from dataclasses import replace

    from tydust_gen.audio.beats import detect_beats

    m = plan.mastering
    sr = audio.TARGET_SAMPLE_RATE
    grid = detect_beats(x, sr, bpm_prior=plan.bpm_prior, beats_per_bar=beats_per_bar(m.meter))
    total_s = x.shape[1] / sr
    if grid.clear:
        target = int(round(_loop_target_s(plan, total_s, on_the_bar=True) * sr))
        loop_stage.make_bar_loop(x, sr, grid, bars=m.bars, target_length=max(target, 1))  # raises when it cannot fit
    else:
        want = loop_stage.plain_loop_length_s(_loop_target_s(plan, total_s, on_the_bar=False), bars=m.bars,
                                              beats_per_bar=grid.beats_per_bar, bpm_prior=plan.bpm_prior)  # fmt: skip
        fade = loop_stage.DEFAULT_LOOP_CROSSFADE_S
        if want < MIN_PLAIN_LOOP_S or want + fade > total_s:
            raise UsageError(
                f"{plan.source.path} has no clear beat to cut bars on (tempo confidence {grid.confidence:.2f}), and a loop "
                f"by length needs {max(want, MIN_PLAIN_LOOP_S) + fade:.1f} s of its {total_s:.2f} s; use a shorter --duration"
            )
    return replace(plan, grid=grid)


def render_file(plan: MasterPlan, *, ffmpeg: Ffmpeg, overwrite: bool) -> TrackResult:
    """Master one planned file into ``NAME.mp3`` + ``NAME.ogg`` + ``NAME.json`` (+ ``NAME.png``).

    Raises:
        TydustError subclasses on failure; nothing of this file is left behind.
    """
    t0 = time.perf_counter()
    m = plan.mastering
    sr = audio.TARGET_SAMPLE_RATE
    samples, rate, _ = read_audio(ffmpeg, plan.source.path)
    raw = _to_44k1(samples, rate)
    dc_offset = [_num(v) for v in raw.mean(axis=1)]
    x = _prepare(plan, raw)  # resampled once: raw is only read (remove_dc returns a new array)
    loop_info = None
    looped = None
    if m.loop:
        on_the_bar = plan.grid is not None and plan.grid.clear
        looped = loop_stage.loop_take(
            x, sr, duration_s=_loop_target_s(plan, x.shape[1] / sr, on_the_bar=on_the_bar), bars=m.bars,
            meter=m.meter, bpm_prior=plan.bpm_prior, grid=plan.grid,
        )  # fmt: skip
        x = looped.loop.samples
        loop_info = looped.info
    elif m.fade_in_s or m.fade_out_s:
        x = master_stage.apply_fades(x, sr, fade_in_s=m.fade_in_s, fade_out_s=m.fade_out_s)
    t1 = time.perf_counter()
    tags = TrackTags(
        title=plan.name,
        genre=None,
        comment=f"mastered by tydust-gen from {plan.source.path.name} (sha256 {plan.source.sha256[:16]})",
        bpm=plan.bpm_prior if plan.bpm_prior is not None else (loop_info or {}).get("bpm"),
    )
    result = TrackResult(name=plan.name)
    try:
        with export.Staging(plan.out_dir, plan.name, ffmpeg=ffmpeg) as staging:

            def encode(mastering_pass) -> list[MeasuredFile]:
                # each file is measured in its encoding thread: the MP3 once written, while the OGG encodes
                peaks = EncodedPeaks(circular=m.loop)  # the OGG is measured while it is encoded
                wave = Waveform(_tensor(mastering_pass.samples), sr)
                return staging.encode(wave, tags, then=peaks.measure, watch=peaks.watch)

            mastered = master_for_encoding(
                x, sr, encode, target_lufs=m.loudness_lufs, ceiling_dbtp=m.true_peak_dbtp, circular=m.loop
            )
            if looped is not None and loop_info is not None:
                write_loop_tags(staging.staged("ogg"), loop_info["loop_start"], loop_info["loop_length"])
                seam = loop_stage.seam_metric(mastered.master.samples, sr, **looped.seam_options)
                loop_info.update({f"seam_{k}": _num(v) for k, v in seam.__dict__.items()})
            if m.preview:
                from tydust_gen.audio.preview import render_preview

                staged_png = staging.add_extra(f"{plan.name}{PREVIEW_SUFFIX}")
                render_preview(mastered.master.samples, sr, staged_png, title=plan.name,
                               loop_seam=loop_info["loop_length"] if loop_info else None)  # fmt: skip
                result.preview = plan.out_dir / staged_png.name
            result.loop = loop_info
            result.loudness = _loudness_figures(m, mastered, dc_offset)

            def finish_timings() -> None:
                result.timings = {"audio": t1 - t0, "master_export": time.perf_counter() - t1}
                result.timings["total"] = sum(result.timings.values())

            def sidecar(files):
                finish_timings()
                result.files = list(files)
                record = build_record(plan, result, ffmpeg=ffmpeg)
                return {provenance.record_path(plan.out_dir, plan.name).name: provenance.record_bytes(record)}

            result.files = staging.publish(x.shape[1] / sr, overwrite=overwrite, sidecar=sidecar)
            finish_timings()
    except FileExistsError as exc:
        raise UsageError(f"{exc.args[0]} appeared while mastering; pass --force to replace it") from None
    return result


def build_record(plan: MasterPlan, result: TrackResult, *, ffmpeg: Ffmpeg) -> dict[str, Any]:
    """``NAME.json`` of a mastered file: its source, the options, what was measured, and the outputs."""
    res = provenance.to_jsonable(result)
    files = res.pop("files", [])
    for f in files:
        f["path"] = Path(f["path"]).name  # relative: the record lives beside the files
    for key in ("name", "settings", "seed_was_random", "steps", "windows", "take", "takes", "batch_seed", "error"):
        res.pop(key, None)
    src = plan.source
    return {
        "format": RECORD_FORMAT,
        "version": RECORD_VERSION,
        "track": plan.name,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "file": str(src.path),
            "sha256": src.sha256,
            "size_bytes": src.size_bytes,
            "sample_rate": src.sample_rate,
            "decoded_rate": src.decoded_rate,
            "channels_decoded": src.channels,
            "duration_s": round(src.duration_s, 6),
            "peak_dbfs": _num(src.peak_dbfs),
        },
        "mastering": provenance.to_jsonable(plan.mastering),
        "duration_s": plan.duration_s,
        "bpm_prior": plan.bpm_prior,
        "versions": {**provenance.package_versions(), "librosa": _version("librosa"), "ffmpeg": ffmpeg.version},
        "ffmpeg": {"path": ffmpeg.path, "source": ffmpeg.source},
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        "result": res,
        "files": files,
    }


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def master_files(request: MasterRequest, listener: RunListener | None = None) -> MasterBatch:
    """Check every file, lock every name, then master them one by one.

    Raises:
        UsageError: a file is unreadable or silent, an option is bad, outputs are in the way,
            a name is given twice, or a loop cannot fit (before anything is written).
        EnvironmentProblem, TrackBusyError: ffmpeg, the output folder, another writer.
    """
    from tydust_gen.runs.locks import TrackLocks

    listener = listener or RunListener()
    started = time.perf_counter()
    if not request.files:
        raise UsageError("name at least one audio file, e.g. tydust-gen master theme.wav")
    ffmpeg = find_ffmpeg()
    check_encoders(ffmpeg)
    plans: list[MasterPlan] = []
    seen: dict[Path, Path] = {}
    for path in request.files:
        plan = plan_file(Path(path), request, ffmpeg)
        key = (plan.out_dir / plan.name).resolve()
        if key in seen:
            raise UsageError(f"{path} and {seen[key]} would both be written as {plan.name}.mp3; rename one")
        seen[key] = Path(path)
        plans.append(plan)
    batch = MasterBatch(plans)
    with TrackLocks() as locks:
        for plan in plans:
            locks.acquire(plan.out_dir, plan.name)
        for plan in plans:
            try:
                with listener.track(plan.name):
                    batch.results.append(render_file(plan, ffmpeg=ffmpeg, overwrite=request.force))
            except TydustError as exc:
                listener.track_failed(plan.name, str(exc))
                batch.results.append(TrackResult(name=plan.name, error=str(exc)))
                continue
            r = batch.results[-1]
            if r.loudness and not r.loudness["ceiling_met"]:
                listener.warn(f"{r.name}: the encoded files peak above {r.loudness['ceiling_dbtp']:g} dBTP after 3 tries")
            if r.loudness and not r.loudness["target_reached"]:
                listener.warn(
                    f"{r.name}: reached {r.loudness['output_lufs']} LUFS, not {r.loudness['target_lufs']:g}, "
                    f"within the {r.loudness['ceiling_dbtp']:g} dBTP ceiling"
                )
    batch.total_s = time.perf_counter() - started
    return batch


__all__ = ["MasterBatch", "MasterPlan", "MasterRequest", "SourceAudio", "master_files", "read_audio", "render_file"]
