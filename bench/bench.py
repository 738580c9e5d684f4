"""Side-by-side speed of the decode backends on a full-size (random-weight) musicgen-small.

Not part of the test suite. Builds the musicgen-small architecture from
``bench/musicgen_small_config.json`` with random weights (nothing downloaded; the
tokenizer is the tiny one, speed does not depend on it), then for each duration
and batch size runs every backend in the same process, interleaved, and reports:
text encoding, ms per decoding step (median, p90), whole LM time, EnCodec decode,
peak RSS / peak GPU memory, real-time factor; plus the memory-bandwidth floor of a
decode step, a teacher-forcing logits parity check and the int8 quality cost.

    PYTHONPATH=src python bench/bench.py --device cpu --durations 2 --batches 1,4
    PYTHONPATH=src python bench/bench.py --device cuda --durations 90 --batches 1,4 --reps 1

``--family mono,stereo`` builds musicgen-stereo-small too (the same decoder with 8
codebooks over 2 audio channels) and interleaves the families as well as the backends,
then reports the stereo/mono ratio of the step time per backend:

    PYTHONPATH=src python bench/bench.py --device cpu --durations 2 --batches 1 --family mono,stereo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from tydust_gen.export.ffmpeg import find_ffmpeg
from tydust_gen.export.loudness import master_for_encoding
from tydust_gen.export.tags import TrackTags

HERE = Path(__file__).resolve().parent
CONFIG_PATH = HERE / "musicgen_small_config.json"
FLOOR_SWEEP_BYTES = 1 << 30  # 1 GiB buffer for the bandwidth probe: far beyond any cache
PROMPTS = ["dark synth bass, intense", "calm menu music", "dark wave", "synth music"]
SEED = 1234
FAMILIES = ("mono", "stereo")
#: What facebook/musicgen-stereo-small's config changes against musicgen-small: its decoder carries
#: 2 audio channels, each with the 4 codebooks of the same mono 32 kHz EnCodec (left, right interleaved).
STEREO_CHANNELS = 2


def build_full_size(device: torch.device, dtype: torch.dtype, family: str = "mono"):
    """Random-weight musicgen-small (``family="stereo"``: musicgen-stereo-small) as a LoadedModel (model, tiny tokenizer)."""
    from transformers import (
        EncodecConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        T5Config,
    )

    from tydust_gen.model.loading import ModelSource, describe_model, quiet_transformers
    from tydust_gen.model.tiny import build_tiny_model

    quiet_transformers()
    raw = json.loads(CONFIG_PATH.read_text())
    strip = lambda d: {k: v for k, v in d.items() if k != "model_type"}  # noqa: E731
    decoder = strip(raw["decoder"])
    if family == "stereo":
        decoder["num_codebooks"] *= STEREO_CHANNELS
        decoder["audio_channels"] = STEREO_CHANNELS
    elif family != "mono":
        raise ValueError(f"unknown family {family!r}; use one of {', '.join(FAMILIES)}")
    config = MusicgenConfig(
        text_encoder=T5Config(**strip(raw["text_encoder"])),
        audio_encoder=EncodecConfig(**strip(raw["audio_encoder"])),
        decoder=MusicgenDecoderConfig(**decoder),
    )
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(config).eval()
    for key, value in raw["generation"].items():
        setattr(model.generation_config, key, value)
    # as load_model does: T5 and EnCodec fp32, the decoder in the compute dtype
    model = model.to(device=device)
    model.decoder.to(dtype)
    _, processor = build_tiny_model()
    name = "musicgen-small" if family == "mono" else "musicgen-stereo-small"
    # rates, codebooks, channels and family derived from the config exactly as load_model derives them
    return describe_model(
        model, processor, source=ModelSource(f"bench:{name}-random", None, None), device=device, dtype=dtype
    )


def machine(device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    info = {
        "cpu": cpu,
        "cpu_cores_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def step_weight_bytes(loaded, int8: bool = False) -> int:
    """Bytes of decoder weights one decode step must read (text K/V projections excluded: once per window)."""
    dec = loaded.model.decoder.model.decoder
    n = 0
    for layer in dec.layers:
        for lin in (
            layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.out_proj,
            layer.encoder_attn.q_proj, layer.encoder_attn.out_proj, layer.fc1, layer.fc2,
        ):
            n += lin.weight.numel()
    n += sum(h.weight.numel() for h in loaded.model.decoder.lm_heads)
    return n * (1 if int8 else loaded.model.decoder.lm_heads[0].weight.element_size())


def resample_and_export(wave, duration_s: float) -> float:
    """Seconds for the stages after decoding, on one take: 44.1 kHz stereo, DC removal,
    loudness/true-peak mastering checked on the encoded files, MP3 + OGG encode and verify."""
    import tempfile

    from tydust_gen.audio import master
    from tydust_gen.audio import resample as audio
    from tydust_gen.base.waveform import Waveform
    from tydust_gen.export import staging as export

    ffmpeg = find_ffmpeg()
    tags = TrackTags(title="bench", genre=None, comment="bench")
    t = time.perf_counter()
    stereo = audio.to_44k1_stereo(wave, duration_s)
    x = master.remove_dc(stereo.samples.numpy(), stereo.sample_rate)
    with tempfile.TemporaryDirectory() as tmp, export.Staging(Path(tmp), "bench", ffmpeg=ffmpeg) as staging:
        def encode(result):
            return staging.encode(Waveform(torch.from_numpy(result.samples.copy()), stereo.sample_rate), tags)

        master_for_encoding(x, stereo.sample_rate, encode)
        staging.publish(duration_s)
    return time.perf_counter() - t


def read_bandwidth(device, reps: int = 7) -> float:
    """Read bandwidth, bytes/s: median time of summing a 1 GiB fp32 buffer."""
    buf = torch.ones(FLOOR_SWEEP_BYTES // 4, dtype=torch.float32, device=device)
    times = []
    for _ in range(reps + 1):
        sync(device)
        t = time.perf_counter()
        buf.sum()
        sync(device)
        times.append(time.perf_counter() - t)
    del buf
    return FLOOR_SWEEP_BYTES / statistics.median(times[1:])


def run_backend(loaded, backend, cond, duration_s: float):
    """Generate one track's codes; returns (codes, per-step seconds, LM seconds)."""
    from tydust_gen.base.settings import GenerationSettings
    from tydust_gen.model.generate import generate_codes

    stamps = []

    def progress(done, total):
        sync(loaded.device)  # per-step times must include the GPU's work, not just the launches
        stamps.append(time.perf_counter())

    settings = GenerationSettings(duration_s=duration_s, seed=SEED)
    sync(loaded.device)
    t0 = time.perf_counter()
    codes, _, _ = generate_codes(loaded, cond, settings, backend=backend, progress=progress)
    sync(loaded.device)
    lm = time.perf_counter() - t0
    # stamps[0] closes the first step (prefill included); the final call repeats the last step.
    stamps = stamps[:-1]
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return codes, steps, lm


def make_impl(name: str):
    """A backend by CLI name, plus ``fast-mkl``: the fast loop with MKL instead of the native CPU kernel."""
    from tydust_gen.model.backends import make_backend
    from tydust_gen.model.fast import FastBackend

    return FastBackend(native=False) if name == "fast-mkl" else make_backend(name)


def pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def parity(loaded, positions: int) -> dict:
    """fp32 teacher forcing: our incremental logits vs transformers' full forward, max relative error."""
    from tydust_gen.model.conditioning import encode_text
    from tydust_gen.model.fast import FastBackend

    cond = encode_text(loaded, PROMPTS[:1], 3.0)
    torch.manual_seed(5)
    ids = torch.randint(0, loaded.codebook_size, (loaded.num_codebooks, positions), device=loaded.device)
    with torch.inference_mode():
        ref = loaded.model.decoder(
            input_ids=ids.repeat(2, 1), encoder_hidden_states=cond.hidden, encoder_attention_mask=cond.mask
        ).logits.float()
    ours = FastBackend().teacher_forced_logits(loaded, cond, ids)
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    return {"positions": positions, "max_rel_err": err, "top1_agree": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def int8_quality(loaded, codes, cond) -> dict:
    """Teacher-force fp32-generated codes through fp32 and int8; compare the guided next-token distributions."""
    from tydust_gen.model.fast import FastBackend, delay_pattern

    start = int(loaded.model.generation_config.decoder_start_token_id)
    b, k = cond.batch_size, loaded.num_codebooks
    grid = delay_pattern(codes, b, k, 0, start, loaded.device, channels=loaded.audio_channels)[:, :, :-1].reshape(b * k, -1)
    scale = cond.guidance_scale

    def guided(logits):
        c, u = logits.split(logits.shape[0] // 2, dim=0)
        return (u + (c - u) * scale).log_softmax(-1)

    ref = guided(FastBackend().teacher_forced_logits(loaded, cond, grid))
    q = guided(FastBackend(int8=True).teacher_forced_logits(loaded, cond, grid))
    kl = (ref.exp() * (ref - q)).sum(-1)
    return {
        "positions": int(grid.shape[-1]),
        "top1_agreement": (ref.argmax(-1) == q.argmax(-1)).float().mean().item(),
        "mean_kl_nats": kl.mean().item(),
        "fp32_mean_entropy_nats": (-(ref.exp() * ref).sum(-1)).mean().item(),
    }


def loadavg() -> str | None:
    """The kernel's 1/5/15-minute load averages: how busy the shared machine was around the run."""
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--durations", default="2", help="seconds, comma separated (10,30,90 on a GPU)")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument(
        "--impls", default=None,
        help="default: stock,fast-mkl,fast,fast-int8 on CPU (fast-mkl: our loop without the native CPU kernel); "
        "stock,fast on CUDA",
    )
    ap.add_argument(
        "--family", default=None,
        help="model families, comma separated: mono (musicgen-small), stereo (musicgen-stereo-small); "
        "given, every family runs interleaved with the others and the report adds the stereo/mono ratio. "
        "Default: mono only",
    )
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions per configuration")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16"], default="auto")
    ap.add_argument("--parity-positions", type=int, default=24)
    ap.add_argument("--quality", action="store_true", help="measure int8 agreement/KL (CPU)")
    ap.add_argument("--json", default=None, help="default: bench/results/<device type>.json")
    args = ap.parse_args(argv)
    by_family = args.family is not None
    families = [f.strip() for f in args.family.split(",")] if by_family else ["mono"]
    if not families or any(f not in FAMILIES for f in families) or len(set(families)) != len(families):
        ap.error(f"--family takes distinct names from: {', '.join(FAMILIES)}")

    from tydust_gen.model.conditioning import encode_text
    from tydust_gen.model.generate import decode_codes

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from tydust_gen.model.loading import resolve_dtype

    names = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # the old spellings still work
    dtype = resolve_dtype(names.get(args.dtype, args.dtype), device)
    impls = (args.impls or ("stock,fast-mkl,fast,fast-int8" if device.type == "cpu" else "stock,fast")).split(",")
    load_start = loadavg()
    models = {}
    for fam in families:
        t = time.perf_counter()
        models[fam] = build_full_size(device, dtype, fam)
        model_name = "musicgen-small" if fam == "mono" else "musicgen-stereo-small"
        print(f"built random {model_name} on {device} ({dtype}) in {time.perf_counter() - t:.1f} s", flush=True)
    result = {"machine": machine(device), "dtype": str(dtype), "runs": []}
    if by_family:
        result["families"] = families
    print(json.dumps(result["machine"]), flush=True)

    def tag(fam: str) -> str:
        return f"{fam} " if by_family else ""

    bw = read_bandwidth(device)
    nbytes = {fam: step_weight_bytes(models[fam]) for fam in families}
    floors = {}
    for fam in families:
        floor = {"read_GBps": bw / 1e9, "step_weight_bytes": nbytes[fam], "floor_ms": nbytes[fam] / bw * 1e3}
        if "fast-int8" in impls:
            floor["int8_floor_ms"] = step_weight_bytes(models[fam], int8=True) / bw * 1e3
        floors[fam] = floor
        print(
            f"{tag(fam)}floor: {nbytes[fam] / 1e9:.3f} GB/step at {bw / 1e9:.1f} GB/s -> {floor['floor_ms']:.1f} ms/step",
            flush=True,
        )
    # one family: the keys as they always were; several: one entry per family
    result["floor"] = floors if by_family else floors[families[0]]

    if dtype == torch.float32:
        parities = {fam: parity(models[fam], args.parity_positions) for fam in families}
        result["parity"] = parities if by_family else parities[families[0]]
        for fam in families:
            print(f"{tag(fam)}parity", parities[fam], flush=True)

    # one backend object per family: a backend keeps one model's prepared weights
    backends = {fam: {name: make_impl(name) for name in impls} for fam in families}
    if device.type == "cpu":
        from tydust_gen.model import cpu_kernel

        result["cpu_kernel"] = {"available": cpu_kernel.load().available, "detail": cpu_kernel.load().detail}
        print("cpu kernel:", result["cpu_kernel"], flush=True)
    for duration in [float(d) for d in args.durations.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            prompts = (PROMPTS * batch)[:batch]
            conds, text_s = {}, {}
            for fam in families:
                sync(device)
                t = time.perf_counter()
                conds[fam] = encode_text(models[fam], prompts, 3.0)
                sync(device)
                text_s[fam] = time.perf_counter() - t
            per = {
                fam: {name: {"steps": [], "lm_s": [], "rep_medians": [], "rep_vs_floor": []} for name in impls}
                for fam in families
            }
            codes_by = {fam: {} for fam in families}
            for rep in range(args.reps):
                bw = max(bw, read_bandwidth(device, reps=3))
                # the families of one backend run back to back, first one way round, then the other,
                # so a slow spell of the shared machine falls on both sides of the stereo/mono ratio
                order = families if rep % 2 == 0 else families[::-1]
                for name in impls:
                    for fam in order:
                        loaded = models[fam]
                        if device.type == "cuda":
                            torch.cuda.reset_peak_memory_stats(device)
                        # The floor right before this backend's run: on a shared VM the read
                        # bandwidth moves (34 or 60 GB/s here, by where the vCPUs land).
                        near_bw = read_bandwidth(device, reps=3)
                        codes, steps, lm = run_backend(loaded, backends[fam][name], conds[fam], duration)
                        cell = per[fam][name]
                        cell["rep_vs_floor"].append(statistics.median(steps) / (nbytes[fam] / near_bw))
                        cell["steps"] += steps
                        cell["rep_medians"].append(statistics.median(steps))
                        cell["lm_s"].append(lm)
                        cell["peak_rss_mb"] = peak_rss_mb()
                        if device.type == "cuda":
                            cell["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
                        codes_by[fam][name] = codes
                        print(f"  {duration:g}s B={batch} rep {rep} {tag(fam)}{name}: {lm:.2f} s", flush=True)
            for fam in families:
                loaded = models[fam]
                floor = floors[fam]
                same = {n: bool(torch.equal(codes_by[fam][n], codes_by[fam][impls[0]])) for n in impls}
                sync(device)
                t = time.perf_counter()
                waves = decode_codes(loaded, codes_by[fam][impls[-1]])
                sync(device)
                decode_s = time.perf_counter() - t
                resample_export_s = resample_and_export(waves[0], duration)
                base = statistics.median(per[fam][impls[0]]["steps"])
                base_best = min(per[fam][impls[0]]["rep_medians"])
                floor["read_GBps"] = bw / 1e9
                floor["floor_ms"] = nbytes[fam] / bw * 1e3
                if "int8_floor_ms" in floor:
                    floor["int8_floor_ms"] = step_weight_bytes(loaded, int8=True) / bw * 1e3
                for name in impls:
                    cell = per[fam][name]
                    steps = cell["steps"]
                    med = statistics.median(steps)
                    lm = statistics.median(cell["lm_s"])
                    row = {"family": fam} if by_family else {}
                    row.update({
                        "duration_s": duration,
                        "batch": batch,
                        "impl": name,
                        "text_encode_s": text_s[fam],
                        "step_ms_median": med * 1e3,
                        "step_ms_p90": pct(steps, 0.9) * 1e3,
                        # the least disturbed repetition: other jobs on a shared CPU only ever add time
                        "step_ms_best_rep": min(cell["rep_medians"]) * 1e3,
                        "steps_measured": len(steps),
                        "lm_s": lm,
                        "encodec_decode_s": decode_s,
                        "resample_export_s": resample_export_s,  # first take: 44.1 kHz stereo, master, MP3 + OGG
                        "peak_rss_mb_so_far": cell["peak_rss_mb"],
                        "peak_gpu_mb": cell.get("peak_gpu_mb"),
                        "rtf": (text_s[fam] + lm + decode_s) / duration,
                        "speedup_vs_" + impls[0]: base / med,
                        "speedup_best_rep_vs_" + impls[0]: base_best / min(cell["rep_medians"]),
                        "floor_ms": floor["floor_ms"],
                        "vs_floor": med * 1e3 / floor["floor_ms"],
                        "best_rep_vs_floor": min(cell["rep_medians"]) * 1e3 / floor["floor_ms"],
                        # each repetition against a floor probed just before it, median over repetitions
                        "vs_adjacent_floor": statistics.median(cell["rep_vs_floor"]),
                        "rep_step_ms": [round(v * 1e3, 2) for v in cell["rep_medians"]],
                        "rep_vs_adjacent_floor": [round(v, 3) for v in cell["rep_vs_floor"]],
                        "tokens_equal_" + impls[0]: same[name],
                    })
                    result["runs"].append(row)
                print(
                    f"{duration:g}s B={batch}{' ' + fam if by_family else ''}: text {text_s[fam]:.2f} s, EnCodec {decode_s:.2f} s, "
                    f"resample + master + export {resample_export_s:.2f} s",
                    flush=True,
                )
                for row in result["runs"][-len(impls):]:
                    print(
                        f"  {row['impl']:>10}: step median {row['step_ms_median']:.1f} ms p90 {row['step_ms_p90']:.1f} ms "
                        f"best rep {row['step_ms_best_rep']:.1f} ms (x{row['speedup_best_rep_vs_' + impls[0]]:.2f}), "
                        f"LM {row['lm_s']:.2f} s, x{row['speedup_vs_' + impls[0]]:.2f} vs {impls[0]}, "
                        f"{row['vs_floor']:.2f}x floor ({row['floor_ms']:.1f} ms), {row['vs_adjacent_floor']:.2f}x adjacent floor, RTF {row['rtf']:.2f}, tokens equal: {row['tokens_equal_' + impls[0]]}",
                        flush=True,
                    )
                if args.quality and "fast-int8" in impls and batch == 1:
                    quality = int8_quality(loaded, codes_by[fam]["fast"], conds[fam])
                    if by_family:
                        result.setdefault("int8_quality", {})[fam] = quality
                    else:
                        result["int8_quality"] = quality
                    print(f"{tag(fam)}int8 quality", quality, flush=True)
            if "mono" in families and "stereo" in families:
                result.setdefault("stereo_vs_mono", []).extend(stereo_vs_mono(result["runs"], duration, batch, impls))
                print(f"{duration:g}s B={batch} stereo / mono step time:", flush=True)
                for r in result["stereo_vs_mono"][-len(impls):]:
                    print(
                        f"  {r['impl']:>10}: median x{r['median_ratio']:.3f}, p90 x{r['p90_ratio']:.3f}, "
                        f"best rep x{r['best_rep_ratio']:.3f}",
                        flush=True,
                    )
    result["loadavg"] = {"start": load_start, "end": loadavg()}
    out = Path(args.json) if args.json else HERE / "results" / f"{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def stereo_vs_mono(runs, duration: float, batch: int, impls) -> list[dict]:
    """Per backend: the stereo family's step time over the mono one's (median, p90, least disturbed repetition)."""
    cell = {(r["family"], r["impl"]): r for r in runs if r["duration_s"] == duration and r["batch"] == batch}
    out = []
    for name in impls:
        mono, stereo = cell["mono", name], cell["stereo", name]
        out.append({
            "duration_s": duration,
            "batch": batch,
            "impl": name,
            "mono_step_ms_median": mono["step_ms_median"],
            "stereo_step_ms_median": stereo["step_ms_median"],
            "median_ratio": stereo["step_ms_median"] / mono["step_ms_median"],
            "p90_ratio": stereo["step_ms_p90"] / mono["step_ms_p90"],
            "best_rep_ratio": stereo["step_ms_best_rep"] / mono["step_ms_best_rep"],
            "floor_ratio": stereo["floor_ms"] / mono["floor_ms"],
        })
    return out


if __name__ == "__main__":
    sys.exit(main())
