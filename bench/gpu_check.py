"""CUDA correctness checks for FastBackend on the full-size random musicgen-small (run by gpu_check.sh).

1. fp32 teacher forcing: our step-by-step logits vs transformers' forward (≤ 1e-4 relative).
2. fp32 greedy: identical tokens to StockBackend (5 s, CUDA graph on).
3. fp16: teacher-forced logits finite and close to fp32; greedy token agreement with
   fp16 StockBackend (reported; fp16 rounding makes exact identity unlikely over long runs).
Prints one JSON object and exits 1 if a hard check fails.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import os  # noqa: E402

from bench import PROMPTS, build_full_size, parity  # noqa: E402
from tydust_gen.base.settings import GenerationSettings, SamplingSettings  # noqa: E402
from tydust_gen.model.conditioning import encode_text  # noqa: E402
from tydust_gen.model.fast import FastBackend  # noqa: E402
from tydust_gen.model.generate import generate_codes  # noqa: E402
from tydust_gen.model.loading import LoadedModel
from tydust_gen.model.stock import StockBackend

GREEDY_S = float(os.environ.get("GPU_CHECK_SECONDS", "5"))  # seconds of audio for the token comparisons
#: GPU_CHECK_DEVICE=cpu runs the same script as a (slow) smoke test without a GPU.
DEVICE = os.environ.get("GPU_CHECK_DEVICE", "cuda")


def greedy(loaded, backend):
    cond = encode_text(loaded, PROMPTS[:1], 3.0)
    settings = GenerationSettings(duration_s=GREEDY_S, seed=0, sampling=SamplingSettings(do_sample=False))
    codes, _, _ = generate_codes(loaded, cond, settings, backend=backend)
    return codes


def main() -> int:
    device = torch.device(DEVICE)
    report: dict = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none (smoke test)"}
    loaded = build_full_size(device, torch.float32)
    report["fp32_parity"] = parity(loaded, 48)
    a, b = greedy(loaded, StockBackend()), greedy(loaded, FastBackend())
    report["fp32_greedy_identical"] = bool(torch.equal(a, b))
    report["fp32_greedy_agreement"] = (a == b).float().mean().item()

    cond = encode_text(loaded, PROMPTS[:1], 3.0)
    torch.manual_seed(5)
    ids = torch.randint(0, loaded.codebook_size, (loaded.num_codebooks, 48), device=device)
    ref32 = FastBackend().teacher_forced_logits(loaded, cond, ids)
    half = LoadedModel(**{**loaded.__dict__, "model": loaded.model.half(), "dtype": torch.float16})
    cond16 = encode_text(half, PROMPTS[:1], 3.0)
    ours16 = FastBackend().teacher_forced_logits(half, cond16, ids)
    report["fp16_logits_finite"] = bool(torch.isfinite(ours16).all())
    report["fp16_vs_fp32_max_rel_err"] = ((ours16 - ref32).abs().max() / ref32.abs().max()).item()
    report["fp16_vs_fp32_top1"] = (ours16.argmax(-1) == ref32.argmax(-1)).float().mean().item()
    a16, b16 = greedy(half, StockBackend()), greedy(half, FastBackend())
    report["fp16_greedy_agreement"] = (a16 == b16).float().mean().item()
    differs = (a16 != b16).any(dim=1)[0].nonzero()
    report["fp16_first_divergent_frame"] = int(differs[0]) if len(differs) else None
    print(json.dumps(report, indent=2))
    ok = (
        report["fp32_parity"]["max_rel_err"] <= 1e-4
        and report["fp32_greedy_identical"]
        and report["fp16_logits_finite"]
        and report["fp16_vs_fp32_max_rel_err"] <= 5e-2
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
