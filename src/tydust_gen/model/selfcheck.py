"""Self-check before a long run: our decode step against transformers' own forward, with a fallback ladder.

The first time a backend is used on a loaded model (per :class:`CheckedBackend`,
i.e. per command or worker process), :func:`measure` feeds
:data:`SELF_CHECK_POSITIONS` teacher-forced positions of fixed pseudo-random
tokens through the rung's step and through ``model.decoder(...)`` (under the same
autocast the stock backend uses) and compares the logits. A rung whose logits are
non-finite, disagree beyond :data:`TOLERANCE` for the compute dtype, or whose
step raises (a CUDA graph that does not capture) is dropped for the next one:

=========  =====================================================================
CUDA       ``fast`` with a CUDA graph → ``fast`` eager → ``stock`` (transformers)
CPU        ``fast`` (native kernel when built) → ``fast`` on MKL → ``stock``
int8       ``fast-int8`` → ``fast`` → ``stock``
=========  =====================================================================

``stock`` is the reference itself and is not checked. Falling back says so in one
warning line (the ``warn`` callback, which the CLI prints) and
:attr:`CheckedBackend.report` records which path ran and the measured error; the
provenance record and ``--json`` carry it.

The check draws its tokens from a private generator: torch's global RNG, which a
seed drives, is untouched, so a seeded take is the same with or without it.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from tydust_gen.base.errors import GenerationError, TydustError

#: Teacher-forced positions compared (each one decoder step; a few dozen keep the check well under a second on a GPU).
SELF_CHECK_POSITIONS = 24
#: The prompt the check conditions on (guided, so the unconditional half runs too).
SELF_CHECK_PROMPT = "self-check: steady drums, warm bass, bright lead"
SELF_CHECK_GUIDANCE = 3.0
#: Seed of the check's private token generator.
SELF_CHECK_SEED = 20_261_129
#: Largest accepted ``max|ours − ref| / max|ref|`` per compute dtype. Both sides use the same rounded
#: weights; what differs is where each rounds on the way (our residual stream and norms are fp32,
#: transformers' under autocast are not). Measured on the CPU (docs/SPEED.md): fp32 ≈ 1e-6; fp16
#: 1.0e-3 (tiny model) and 1.9e-3 (full-size random musicgen-small); bf16 7.8e-3 and 1.6e-2. The
#: bounds leave 4-10x margin while a broken kernel (wrong cache slot, a missed mask) errs by ~1.
TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 8e-2}
#: int8 weights (CPU): quantisation error on top, measured ≈ 0.02–0.05 on random models.
INT8_TOLERANCE = 0.25


@dataclass(frozen=True)
class Rung:
    """One way of decoding, with how to check it.

    Attributes:
        path: the name recorded in provenance ("fast-cuda-graph", "fast-eager", "fast-native", ...).
        backend: the :class:`~tydust_gen.model.generate.CodeBackend` that decodes.
        graph: check through CUDA-graph replay (as the backend decodes on CUDA).
        checked: compare against transformers (False for stock: it is the reference).
        tolerance: accepted relative error, or None for the dtype's default.
    """

    path: str
    backend: Any
    graph: bool = False
    checked: bool = True
    tolerance: float | None = None


def ladder(name: str, device) -> list[Rung]:
    """The rungs for backend ``name`` on ``device``, best first."""
    from tydust_gen.model import cpu_kernel
    from tydust_gen.model.fast import FastBackend
    from tydust_gen.model.stock import StockBackend

    stock = Rung("stock", StockBackend(), checked=False)
    choice = name.strip().lower()
    if choice == "stock":
        return [stock]
    if device.type == "cuda":
        return [
            Rung("fast-cuda-graph", FastBackend(cuda_graph=True), graph=True),
            Rung("fast-eager", FastBackend(cuda_graph=False)),
            stock,
        ]
    rungs = []
    if choice == "fast-int8":
        rungs.append(Rung("fast-int8", FastBackend(int8=True), tolerance=INT8_TOLERANCE))
    # "fast" uses the native CPU kernel when it is built (the record's cpu_kernel field says which);
    # MKL is the next rung unless the kernel is known to be off already (then it is the same rung).
    rungs.append(Rung("fast", FastBackend()))
    state = cpu_kernel.status()
    if state is None or state.available:
        rungs.append(Rung("fast-mkl", FastBackend(native=False)))
    rungs.append(stock)
    return rungs


@dataclass(frozen=True)
class Measurement:
    """One rung's check: ``error`` is ``max|ours − ref| / max|ref|`` (nan/inf when not finite)."""

    path: str
    ok: bool
    error: float | None
    tolerance: float
    reason: str | None = None


def check_inputs(loaded):
    """The check's conditioning and token grid: ``(cond, ids [K, T] on the device)``."""
    import torch

    from tydust_gen.model.conditioning import encode_text

    positions = min(SELF_CHECK_POSITIONS, loaded.max_positions)
    gen = torch.Generator(device="cpu").manual_seed(SELF_CHECK_SEED)
    ids = torch.randint(0, loaded.codebook_size, (loaded.num_codebooks, positions), generator=gen)
    ids[:, 0] = int(loaded.model.generation_config.decoder_start_token_id)
    cond = encode_text(loaded, [SELF_CHECK_PROMPT], SELF_CHECK_GUIDANCE)
    return cond, ids.to(loaded.device)


def reference_logits(loaded, cond, ids):
    """transformers' forward over the teacher-forced ids, float32 ``[B'·K, T, V]``."""
    import torch

    from tydust_gen.model.stock import autocast

    copies = cond.hidden.shape[0] * loaded.num_codebooks // ids.shape[0]
    with torch.inference_mode(), autocast(loaded):
        out = loaded.model.decoder(
            input_ids=ids.repeat(copies, 1), encoder_hidden_states=cond.hidden, encoder_attention_mask=cond.mask
        ).logits
    return out.float()


def measure(loaded, rung: Rung, cond, ids, ref) -> Measurement:
    """Compare ``rung``'s teacher-forced logits with ``ref``; a step that raises counts as a failure."""
    import torch

    dtype = str(loaded.model.decoder.lm_heads[0].weight.dtype).replace("torch.", "")
    tol = rung.tolerance if rung.tolerance is not None else TOLERANCE.get(dtype, TOLERANCE["float32"])
    try:
        ours = rung.backend.teacher_forced_logits(loaded, cond, ids, graph=rung.graph)
    except torch.cuda.OutOfMemoryError:
        raise  # a smaller rung would not fit either; the caller says what to do
    except (RuntimeError, TydustError) as exc:  # a graph that does not capture, a step that cannot run here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return Measurement(rung.path, False, None, tol, f"its step failed: {first[:160]}")
    if not bool(torch.isfinite(ours).all()):
        return Measurement(rung.path, False, float("nan"), tol, "non-finite logits")
    err = ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    if not err <= tol:
        return Measurement(rung.path, False, err, tol, f"logits differ from transformers by {err:.3g} (> {tol:g})")
    return Measurement(rung.path, True, err, tol)


class CheckedBackend:
    """A backend that self-checks on first use and falls down its ladder (see the module docstring).

    Args:
        name: the backend the user asked for ("fast", "fast-int8", "stock").
        warn: called with one line when a rung is dropped (the CLI's warning channel).
    """

    def __init__(self, name: str, *, warn: Callable[[str], None] | None = None):
        self.name = name
        self.warn = warn or (lambda line: None)
        self._active: Any = None
        self._checked: tuple | None = None  # (weakref to the model, device, dtype) the choice was made for
        #: what ran and why, for the provenance record; None until the first window
        self.report: dict[str, Any] | None = None

    @property
    def supports_take_generators(self) -> bool:
        if self._active is not None:
            return bool(getattr(self._active, "supports_take_generators", False))
        return self.name.strip().lower() != "stock"

    def active_for(self, loaded):
        """The backend that passed the check for ``loaded`` (checking now on first use)."""
        weights = loaded.model.decoder.lm_heads[0].weight
        key = (weights.device, weights.dtype)
        if self._checked is None or self._checked[0]() is not loaded.model or self._checked[1:] != key:
            self._active, self.report = choose(loaded, ladder(self.name, loaded.device), self.warn, self.name)
            self._checked = (weakref.ref(loaded.model), *key)
        return self._active

    def generate_window(self, loaded, cond, prefix, new_frames, sampling, on_step, generators=None):
        active = self.active_for(loaded)
        if generators is None:
            return active.generate_window(loaded, cond, prefix, new_frames, sampling, on_step)
        if not getattr(active, "supports_take_generators", False):
            raise GenerationError(
                "the self-check sent this run to transformers' generate, which cannot give each take its own "
                "seed; generate the variations one at a time (--variations 1 with different seeds)"
            )
        return active.generate_window(loaded, cond, prefix, new_frames, sampling, on_step, generators=generators)


def choose(loaded, rungs: list[Rung], warn: Callable[[str], None], requested: str):
    """Walk ``rungs`` until one passes; returns ``(backend, report)``."""
    from tydust_gen.model.loading import dtype_name

    started = time.perf_counter()
    report: dict[str, Any] = {"requested": requested, "dtype": dtype_name(loaded.model.decoder.lm_heads[0].weight.dtype)}
    failed: list[dict[str, Any]] = []
    inputs = ref = None
    for i, rung in enumerate(rungs):
        if not rung.checked:
            chosen, result = rung, None
            break
        if ref is None:
            inputs = check_inputs(loaded)
            ref = reference_logits(loaded, *inputs)
            if not bool(ref.isfinite().all()):
                raise GenerationError(
                    f"the model's own forward gives non-finite logits in {report['dtype']} on {loaded.device}; "
                    "use --dtype fp32"
                )
        result = measure(loaded, rung, inputs[0], inputs[1], ref)
        if result.ok:
            chosen = rung
            break
        failed.append({"path": rung.path, "error": result.error, "tolerance": result.tolerance, "reason": result.reason})
        nxt = rungs[i + 1].path if i + 1 < len(rungs) else None
        if nxt is None:
            raise GenerationError(f"every decode path failed the self-check (last: {rung.path}, {result.reason})")
        warn(f"self-check: {rung.path} on {loaded.device} ({report['dtype']}) failed: {result.reason}; using {nxt}")
    report["path"] = chosen.path
    report["self_check"] = None if result is None else {
        "positions": int(inputs[1].shape[-1]),
        "max_error": result.error,
        "tolerance": result.tolerance,
        "metric": "max|ours - transformers| / max|transformers| over teacher-forced logits",
    }
    report["fell_back_from"] = failed
    report["check_s"] = round(time.perf_counter() - started, 4)
    return chosen.backend, report
