"""Our own MusicGen decode loop: the same tokens as transformers' ``generate``, with less overhead.

:class:`FastBackend` is a :class:`~tydust_gen.model.generate.CodeBackend` that runs the
MusicGen decoder math directly on the model's weights instead of through
``model.decoder.generate``. What it promises:

* **Same tokens.** The delay pattern, classifier-free guidance and the sampling
  warpers (temperature → top-k → top-p, softmax, ``torch.multinomial`` on a
  ``[B·K, V]`` tensor) follow transformers step for step and draw from torch's
  global RNG in the same order, so a seed gives the tokens of
  :class:`~tydust_gen.model.stock.StockBackend` (fp32; fp16 on CUDA agrees closely
  but not bit for bit).
* **Less work per step.** The text's cross-attention keys/values are computed
  once per window; self-attention keys/values live in a cache preallocated for
  the whole window; the guided and unguided halves run as one batch; the q/k/v
  projections and the K output heads are fused into one matrix each.
* **CPU.** With 1–8 rows per step, MKL streams a weight matrix at full memory
  bandwidth only as ``W @ xᵀ`` (a skinny GEMM), not as ``x @ Wᵀ`` (which is what
  ``nn.Linear`` does; measured 3–4× slower here), so the step uses the former —
  or, where a C++ compiler is present, :mod:`tydust_gen.model.cpu_kernel`, which streams
  the model's own weights (no copy) closer still to the memory's read rate.
  ``int8=True`` swaps every per-step projection for fbgemm's dynamic int8 linear
  with per-channel weight scales: a quarter of the bytes per step, at a small,
  measured quality cost (see docs/BENCHMARKS.md).
* **Precision.** Projections run in the decoder's weight dtype (fp16/bf16/fp32,
  ``--dtype``); the residual stream, layer norms, softmax and logits stay fp32,
  as under audiocraft's autocast. Attention scores come from a GEMM in the
  weight dtype (fp32 accumulation inside the kernel, rounded once) and are
  normalised in fp32; the KV cache is in the weight dtype.
* **CUDA.** The per-step function is captured once per window in a CUDA graph
  over static buffers, so Python no longer dominates a step. CPU runs never
  touch CUDA APIs.
* **Finite or nothing.** Non-finite logits (NaN/inf) stop the take with a
  :class:`GenerationError` instead of sampling noise; on CUDA the check reads a
  device-side flag every :data:`FINITE_CHECK_EVERY` steps so the loop stays
  asynchronous.

Generation-config features transformers would add on top (EOS stopping,
repetition penalties, min-length) are not used by MusicGen checkpoints and are
not implemented; :func:`check_supported` refuses configs that set them.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from tydust_gen.base.errors import DeviceError, GenerationError
from tydust_gen.base.settings import SamplingSettings
from tydust_gen.model import cpu_kernel
from tydust_gen.model.conditioning import Conditioning
from tydust_gen.model.loading import LoadedModel

#: Up to this many rows per matmul the CPU path computes ``(W @ xᵀ)ᵀ``; above it
#: (the prefill of a context window) plain ``F.linear`` is the faster kernel.
SKINNY_MAX_ROWS = 16
#: Additive attention bias for masked text positions. Finite (unlike -inf) so the
#: all-masked unconditional rows give uniform weights over all-zero values, i.e.
#: exactly zero, as in transformers; small enough in magnitude to stay finite in fp16.
MASK_BIAS = -30_000.0
#: On CUDA, steps between reads of the device-side "non-finite logits seen" flag
#: (each read waits for the GPU); on the CPU the flag is read every step.
FINITE_CHECK_EVERY = 64


def check_supported(loaded: LoadedModel) -> None:
    """Refuse models whose generation config asks for processors this loop does not apply.

    Raises:
        GenerationError: the config sets EOS stopping or a penalty processor.
    """
    if loaded.family == "melody":
        # this loop feeds the text through cross-attention; a melody model prepends chroma and text instead
        raise GenerationError(
            f"the fast backend does not run melody models ({loaded.source.ref}); use --backend stock"
        )
    gen = loaded.model.generation_config
    unsupported = []
    if getattr(gen, "eos_token_id", None) is not None:
        unsupported.append("eos_token_id")
    for attr, neutral in (("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0), ("min_new_tokens", None)):
        value = getattr(gen, attr, None)
        if value is not None and value != neutral:
            unsupported.append(attr)
    if getattr(loaded.model.decoder.config, "audio_channels", 1) not in (1, 2):
        unsupported.append("audio_channels")
    if unsupported:
        raise GenerationError(
            f"the fast backend does not support this model's generation settings ({', '.join(unsupported)}); "
            "use --backend stock"
        )


# ----------------------------------------------------------------------------- projections


class _Dense:
    """One projection ``y = x Wᵀ`` in the fastest form for its device and mode.

    Args:
        weight: ``[out, in]`` in the compute dtype, or None when only ``packed`` is used.
        packed: fbgemm prepacked int8 weights (CPU int8 mode), or None.
        skinny: use ``(W @ xᵀ)ᵀ`` for small row counts (CPU fp32).
        native: ``weight`` is read by :mod:`tydust_gen.model.cpu_kernel` for up to
            ``cpu_kernel.MAX_ROWS`` rows (CPU fp32 when the kernel is built).
    """

    __slots__ = ("weight", "packed", "skinny", "native")

    def __init__(self, weight, packed=None, skinny: bool = False, native: bool = False):
        self.weight = weight
        self.packed = packed
        self.skinny = skinny
        self.native = native

    def __call__(self, x):
        """``x [..., in]`` → ``[..., out]``."""
        import torch
        import torch.nn.functional as F

        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.weight is not None and x2.dtype != self.weight.dtype:
            x2 = x2.to(self.weight.dtype)  # the fp32 residual stream into a fp16/bf16 projection
        if self.packed is not None:
            y = torch.ops.quantized.linear_dynamic(x2.contiguous(), self.packed, True)
        elif self.native and x2.shape[0] <= cpu_kernel.MAX_ROWS:
            y = torch.ops.tydust.skinny_mm(x2, [self.weight])
        elif self.skinny and x2.shape[0] <= SKINNY_MAX_ROWS:
            # x must be row-major so that xᵀ is column-major: MKL's fast skinny kernel
            # wants it so (a row-major [in, rows] operand ran fc2 at a fifth of the bandwidth).
            y = torch.mm(self.weight, x2.contiguous().t()).t()
        else:
            y = F.linear(x2, self.weight)
        return y.reshape(*lead, y.shape[-1])


class _Stacked:
    """Several projections of the same input, outputs side by side, as one fused matrix would give.

    The native kernel reads the model's own q/k/v and output-head weights, so no fused
    copy is made for it (one copy of the weights in memory); the rare calls that go
    op by op (prefill, more than ``MAX_ROWS`` rows) run the parts one after another.

    Args:
        parts: the projections, in output order.
        first_scale: multiplies the first part's output (1/sqrt(head_dim) on q), or None.
    """

    __slots__ = ("parts", "first_scale", "native")

    def __init__(self, parts: list[_Dense], first_scale: float | None = None):
        self.parts = parts
        self.first_scale = first_scale
        self.native = all(p.native for p in parts)

    def __call__(self, x):
        import torch

        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.native and x2.shape[0] <= cpu_kernel.MAX_ROWS:
            # one kernel call (one parallel region) for all parts, outputs side by side
            y = torch.ops.tydust.skinny_mm(x2, [p.weight for p in self.parts])
            if self.first_scale is not None:
                y[:, : self.parts[0].weight.shape[0]] *= self.first_scale
        else:
            outs = [p(x2) for p in self.parts]
            if self.first_scale is not None:
                outs[0] = outs[0] * self.first_scale
            y = torch.cat(outs, dim=-1)
        return y.reshape(*lead, y.shape[-1])


def _pack_int8(weight):
    """Per-output-channel symmetric int8 quantisation, prepacked for fbgemm."""
    import torch

    w = weight.detach().float().contiguous()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
    zero = torch.zeros(w.shape[0], dtype=torch.long)
    qw = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qw, None)


@dataclass
class _Layer:
    """Weights of one pre-LN decoder layer, ready for the step function.

    ``native``: this layer's part of ``torch.ops.tydust.layers_step``'s arguments (14
    tensors: layer norms and the model's projections, see cpu_kernel.cpp; 3 epsilons), or
    None when the layer can only run op by op.
    """

    ln_self: tuple
    qkv: _Dense | _Stacked  # self-attention q (scaled by 1/sqrt(hd)), k, v: [3D] outputs
    self_out: _Dense
    ln_cross: tuple
    cross_q: _Dense
    cross_out: _Dense
    cross_k: Any  # [D, D] original weight, used once per window
    cross_v: Any
    ln_ffn: tuple
    fc1: _Dense
    fc2: _Dense
    native: tuple | None = None  # (weights list, eps list)


@dataclass
class _Prepared:
    """Everything the loop needs from one model, in one mode."""

    embed: list  # K tensors [V+1, D]
    positions: Any  # [max_positions, D] sinusoidal table
    layers: list
    final_ln: tuple
    heads: _Dense | _Stacked  # the K output heads: [K*V] outputs
    num_heads: int
    head_dim: int
    scale: float  # 1/sqrt(head_dim), the attention score scale
    hidden: int
    vocab: int
    num_codebooks: int
    gelu: Callable
    dtype: Any
    device: Any
    native: tuple | None = None  # (flat weights, flat eps) of every layer for layers_step, or None


def _prepare(loaded: LoadedModel, int8: bool, native: bool = True) -> _Prepared:
    """Collect the decoder weights for the loop.

    With the native CPU kernel every per-step product reads the model's own weight
    tensors (nothing is copied). Otherwise q/k/v and the K heads are fused into one
    matrix each (a copy of those weights, one product instead of three or four), and
    int8 mode packs its own quantised copy; the rest is shared with the model.
    """
    import torch
    import torch.nn.functional as F

    causal_lm = loaded.model.decoder
    dec = causal_lm.model.decoder
    cfg = causal_lm.config
    on_cpu = loaded.device.type == "cpu"

    kernel = native and on_cpu and not int8 and loaded.model.decoder.lm_heads[0].weight.dtype == torch.float32
    kernel = kernel and cpu_kernel.load().available

    def dense(weight) -> _Dense:
        if int8:
            return _Dense(None, packed=_pack_int8(weight))
        weight = weight.detach()
        return _Dense(weight, skinny=on_cpu, native=kernel and cpu_kernel.can_read(weight))

    def ln(mod) -> tuple:
        # fp32 norms over the fp32 residual stream (a no-op for fp32 weights)
        return (mod.weight.detach().float(), mod.bias.detach().float(), mod.eps)

    layers = []
    for layer in dec.layers:
        ln_self, ln_cross, ln_ffn = ln(layer.self_attn_layer_norm), ln(layer.encoder_attn_layer_norm), ln(layer.final_layer_norm)
        sa, ca = layer.self_attn, layer.encoder_attn
        for proj in (sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj, ca.q_proj, ca.out_proj, layer.fc1, layer.fc2):
            if proj.bias is not None:
                raise GenerationError("the fast backend expects bias-free decoder projections; use --backend stock")
        if kernel:
            qkv = _Stacked([dense(sa.q_proj.weight), dense(sa.k_proj.weight), dense(sa.v_proj.weight)], float(sa.scaling))
        else:
            # Folding 1/sqrt(head_dim) into the q rows saves one op per layer and step.
            qkv = dense(torch.cat([sa.q_proj.weight * sa.scaling, sa.k_proj.weight, sa.v_proj.weight], dim=0))
        item = _Layer(
            ln_self=ln_self,
            qkv=qkv,
            self_out=dense(sa.out_proj.weight),
            ln_cross=ln_cross,
            cross_q=dense(ca.q_proj.weight),
            cross_out=dense(ca.out_proj.weight),
            cross_k=ca.k_proj.weight.detach(),
            cross_v=ca.v_proj.weight.detach(),
            ln_ffn=ln_ffn,
            fc1=dense(layer.fc1.weight),
            fc2=dense(layer.fc2.weight),
        )
        projections = (*(qkv.parts if kernel else [qkv]), item.self_out, item.cross_q, item.cross_out, item.fc1, item.fc2)
        if kernel and all(p.native for p in projections) and cfg.activation_function == "gelu":
            q, k, v = qkv.parts
            weights = [
                ln_self[0], ln_self[1], q.weight, k.weight, v.weight, item.self_out.weight,
                ln_cross[0], ln_cross[1], item.cross_q.weight, item.cross_out.weight,
                ln_ffn[0], ln_ffn[1], item.fc1.weight, item.fc2.weight,
            ]  # fmt: skip
            item.native = (weights, [float(ln_self[2]), float(ln_cross[2]), float(ln_ffn[2])])
        layers.append(item)
    if kernel:
        heads = _Stacked([dense(h.weight) for h in causal_lm.lm_heads])
    else:
        heads = dense(torch.cat([h.weight for h in causal_lm.lm_heads], dim=0))
    if cfg.activation_function == "gelu":
        gelu = F.gelu
    else:  # pragma: no cover - every MusicGen checkpoint uses exact GELU
        gelu = dec.layers[0].activation_fn
    weight_dtype = causal_lm.lm_heads[0].weight.dtype
    native = None
    if layers and all(layer.native is not None for layer in layers):
        native = (
            [t for layer in layers for t in layer.native[0]],
            [e for layer in layers for e in layer.native[1]],
        )
    return _Prepared(
        native=native,
        device=causal_lm.lm_heads[0].weight.device,
        embed=[e.weight.detach() for e in dec.embed_tokens],
        positions=dec.embed_positions.weights.float(),
        layers=layers,
        final_ln=ln(dec.layer_norm),
        heads=heads,
        num_heads=int(cfg.num_attention_heads),
        head_dim=int(cfg.hidden_size) // int(cfg.num_attention_heads),
        scale=float(dec.layers[0].self_attn.scaling),
        hidden=int(cfg.hidden_size),
        vocab=int(cfg.vocab_size),
        num_codebooks=int(cfg.num_codebooks),
        gelu=gelu,
        dtype=weight_dtype,
    )


# ----------------------------------------------------------------------------- per-window state


@dataclass
class _Window:
    """Buffers of one window: self-attention cache, text keys/values and mask.

    The single-position step works on ``[B'·H, ·, hd]`` views of the same
    tensors, so attention is two batched matmuls and a softmax (SDPA's CPU path
    for one query costs several times more dispatches).
    """

    self_k: list  # per layer [B', H, L, hd]
    self_v: list
    cross_k: list  # per layer [B', H, S, hd]
    cross_v: list
    cross_bias: Any  # [B', 1, 1, S] additive (prefill)
    cross_bias_flat: Any  # [B'·H, 1, S] additive (one position)
    length: int  # L, positions the cache holds
    native_caches: list | None = None  # layers_step's cache list (4 per layer, then the [B', S] bias)


def _open_window(prep: _Prepared, cond: Conditioning, length: int) -> _Window:
    """Allocate the window's cache and project the text once for every layer's cross-attention."""
    import torch
    import torch.nn.functional as F

    hidden = cond.hidden.to(prep.dtype)
    rows, text_len = hidden.shape[0], hidden.shape[1]
    shape = (rows, prep.num_heads, length, prep.head_dim)
    # Zeroed, not empty: the CUDA-graph step reads the whole cache under a mask, and
    # masked garbage (NaN) would still poison the weighted sum (0 x NaN = NaN).
    # One allocation for every layer's keys and values, viewed per layer: on the CPU a block this
    # large is its own mapping, returned to the system when the window ends. As 2 x layers blocks
    # of ~13 MB each, glibc could keep them in its heap after the window and the next window's
    # blocks land elsewhere: a 90 s track then peaked 0.6 GiB higher (docs/BENCHMARKS.md).
    per_layer = math.prod(shape)
    store = torch.zeros(2 * len(prep.layers) * per_layer, dtype=prep.dtype, device=prep.device)
    views = [store[i * per_layer : (i + 1) * per_layer].view(shape) for i in range(2 * len(prep.layers))]
    self_k, self_v = views[0::2], views[1::2]
    del store, views
    cross_k, cross_v = [], []
    for layer in prep.layers:
        kv_shape = (rows, text_len, prep.num_heads, prep.head_dim)
        cross_k.append(F.linear(hidden, layer.cross_k).view(kv_shape).transpose(1, 2).contiguous())
        cross_v.append(F.linear(hidden, layer.cross_v).view(kv_shape).transpose(1, 2).contiguous())
    keep = cond.mask.to(device=prep.device, dtype=torch.bool)
    bias = torch.zeros(keep.shape, dtype=prep.dtype, device=prep.device).masked_fill(~keep, MASK_BIAS)
    bias = bias[:, None, None, :]
    flat = bias.expand(rows, prep.num_heads, 1, text_len).reshape(rows * prep.num_heads, 1, text_len)
    native = None
    if prep.native is not None:
        native = [t for i in range(len(prep.layers)) for t in (self_k[i], self_v[i], cross_k[i], cross_v[i])]
        native.append(bias.reshape(rows, text_len).contiguous())
    return _Window(self_k, self_v, cross_k, cross_v, bias, flat, length, native)


def _layer_norm(x, ln):
    import torch.nn.functional as F

    return F.layer_norm(x, (x.shape[-1],), ln[0], ln[1], ln[2])


def _decoder(prep: _Prepared, win: _Window, tokens, start: int | None, pos_t=None):
    """Run the decoder layers over ``T`` new positions and return the final hidden states.

    Args:
        tokens: int64 ``[B', K, T]`` delay-masked input tokens.
        start: first position of ``tokens`` (an int) for eager runs; the cache
            keys are read up to ``start + T``. Prefill (T > 1) must start at 0.
        pos_t: int64 ``[1]`` device tensor of the position, instead of ``start``,
            for the CUDA-graph step (T = 1): the whole cache is read under a mask.

    Returns:
        ``[B', T, D]`` hidden states after the final layer norm.
    """
    import torch

    rows, _, steps = tokens.shape
    x = prep.embed[0][tokens[:, 0]].float()  # the residual stream is fp32 whatever the weights are
    for k in range(1, prep.num_codebooks):
        x = x + prep.embed[k][tokens[:, k]]
    if pos_t is None:
        x = x + prep.positions[start : start + steps]
    else:
        x = x + prep.positions.index_select(0, pos_t)
    if steps > 1:
        return _prefill_layers(prep, win, x)
    h_, d_, n = prep.num_heads, prep.head_dim, rows * prep.num_heads
    if pos_t is None and rows <= cpu_kernel.MAX_ROWS and prep.native is not None and win.native_caches is not None:
        return _native_layers(prep, win, x, start)
    if pos_t is None:
        end = start + 1
        self_bias = None
    else:
        end = win.length
        # Graph replay reads the whole cache; positions after pos_t are hidden.
        later = torch.arange(win.length, device=pos_t.device) > pos_t
        self_bias = torch.zeros((1, 1, win.length), dtype=prep.dtype, device=pos_t.device)
        self_bias = self_bias.masked_fill(later, float("-inf"))
    for i, layer in enumerate(prep.layers):
        h = _layer_norm(x, layer.ln_self)
        qkv = layer.qkv(h).reshape(rows, 3, h_, d_)  # q rows carry the 1/sqrt(hd) scale
        ck, cv = win.self_k[i], win.self_v[i]
        if pos_t is None:
            ck[:, :, start] = qkv[:, 1]
            cv[:, :, start] = qkv[:, 2]
        else:
            ck.index_copy_(2, pos_t, qkv[:, 1, :, None])
            cv.index_copy_(2, pos_t, qkv[:, 2, :, None])
        q = qkv[:, 0].reshape(n, 1, d_)
        keys = ck.view(n, win.length, d_)[:, :end].transpose(1, 2)
        vals = cv.view(n, win.length, d_)[:, :end]
        s = torch.bmm(q, keys) if self_bias is None else torch.baddbmm(self_bias, q, keys)
        a = torch.bmm(torch.softmax(s, dim=-1, dtype=torch.float32).to(vals.dtype), vals)
        x = x + layer.self_out(a.view(rows, 1, prep.hidden))

        h = _layer_norm(x, layer.ln_cross)
        q = layer.cross_q(h).reshape(n, 1, d_)
        text_len = win.cross_k[i].shape[2]
        keys = win.cross_k[i].view(n, text_len, d_).transpose(1, 2)
        s = torch.baddbmm(win.cross_bias_flat, q, keys, alpha=prep.scale)
        vals = win.cross_v[i].view(n, text_len, d_)
        a = torch.bmm(torch.softmax(s, dim=-1, dtype=torch.float32).to(vals.dtype), vals)
        x = x + layer.cross_out(a.view(rows, 1, prep.hidden))

        h = _layer_norm(x, layer.ln_ffn)
        x = x + layer.fc2(prep.gelu(layer.fc1(h)))
    return _layer_norm(x, prep.final_ln)


def _native_layers(prep: _Prepared, win: _Window, x, start: int):
    """All layers for one position in one ``torch.ops.tydust.layers_step`` call (CPU, fp32)."""
    import torch

    rows = x.shape[0]
    weights, eps = prep.native
    h = torch.ops.tydust.layers_step(
        x.reshape(rows, prep.hidden), weights, win.native_caches, start, prep.num_heads, prep.scale, prep.scale, eps
    )
    return _layer_norm(h.view(rows, 1, prep.hidden), prep.final_ln)


def _prefill_layers(prep: _Prepared, win: _Window, x):
    """All layers over ``x [B', T, D]`` from position 0 (causal), filling the cache."""
    import torch.nn.functional as F

    rows, steps, _ = x.shape
    h_, d_ = prep.num_heads, prep.head_dim
    for i, layer in enumerate(prep.layers):
        h = _layer_norm(x, layer.ln_self)
        qkv = layer.qkv(h).reshape(rows, steps, 3, h_, d_)
        ck, cv = win.self_k[i], win.self_v[i]
        ck[:, :, :steps] = qkv[:, :, 1].transpose(1, 2)
        cv[:, :, :steps] = qkv[:, :, 2].transpose(1, 2)
        # the q rows are pre-scaled, hence scale=1
        a = F.scaled_dot_product_attention(
            qkv[:, :, 0].transpose(1, 2), ck[:, :, :steps], cv[:, :, :steps], is_causal=True, scale=1.0
        )
        x = x + layer.self_out(a.transpose(1, 2).reshape(rows, steps, prep.hidden))

        h = _layer_norm(x, layer.ln_cross)
        q = layer.cross_q(h).reshape(rows, steps, h_, d_).transpose(1, 2)
        a = F.scaled_dot_product_attention(
            q, win.cross_k[i], win.cross_v[i], attn_mask=win.cross_bias, scale=prep.scale
        )
        x = x + layer.cross_out(a.transpose(1, 2).reshape(rows, steps, prep.hidden))

        h = _layer_norm(x, layer.ln_ffn)
        x = x + layer.fc2(prep.gelu(layer.fc1(h)))
    return _layer_norm(x, prep.final_ln)


def _logits(prep: _Prepared, hidden):
    """``[B', D]`` last hidden states → float32 ``[B'·K, V]`` logits (row = b'·K + k, as transformers)."""
    import torch

    out = prep.heads(hidden)
    return out.reshape(hidden.shape[0] * prep.num_codebooks, prep.vocab).to(torch.float32)


# ----------------------------------------------------------------------------- token choice


@dataclass(frozen=True)
class _Chooser:
    """transformers' logits processing for MusicGen, in the same order and on the same shapes.

    Attributes:
        guidance: CFG scale, or None when unguided.
        do_sample: multinomial sampling (else argmax).
        temperature: divisor, or None when 1.0 (transformers skips it then).
        top_k: k, or None when off.
        top_p: nucleus mass, or None when off.
    """

    guidance: float | None
    do_sample: bool
    temperature: float | None
    top_k: int | None
    top_p: float | None

    def __call__(self, logits, generators=None):
        """float32 ``[B'·K, V]`` → int64 ``[B·K]`` tokens.

        ``generators``: one ``torch.Generator`` per take (B of them), so each take
        draws from its own seeded stream; None draws all rows from the global RNG,
        exactly as transformers does.
        """
        import torch

        scores = logits
        if self.guidance is not None:
            cond, uncond = scores.split(scores.shape[0] // 2, dim=0)
            scores = uncond + (cond - uncond) * self.guidance
        if not self.do_sample:
            return torch.argmax(scores, dim=-1)
        if self.temperature is not None:
            scores = scores / self.temperature
        if self.top_k is not None:
            k = min(self.top_k, scores.shape[-1])
            kth = torch.topk(scores, k)[0][..., -1, None]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None:
            sorted_scores, order = torch.sort(scores, descending=False)
            drop_sorted = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - self.top_p)
            drop_sorted[..., -1:] = 0
            drop = drop_sorted.scatter(1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if generators is None:
            return torch.multinomial(probs, num_samples=1).squeeze(1)
        per_take = probs.shape[0] // len(generators)
        draws = [
            torch.multinomial(probs[i * per_take : (i + 1) * per_take], num_samples=1, generator=g)
            for i, g in enumerate(generators)
        ]
        return torch.cat(draws).squeeze(1)


def make_chooser(loaded: LoadedModel, sampling: SamplingSettings) -> _Chooser:
    """Build the token chooser from the same keyword arguments StockBackend gives ``generate``."""
    from tydust_gen.model.sampling import sampling_kwargs

    kw = sampling_kwargs(loaded, sampling)
    guidance = kw["guidance_scale"] if kw["guidance_scale"] is not None and kw["guidance_scale"] > 1 else None
    if not kw["do_sample"]:
        return _Chooser(guidance, False, None, None, None)
    temperature = kw.get("temperature")
    top_k = kw.get("top_k")
    top_p = kw.get("top_p")
    return _Chooser(
        guidance=guidance,
        do_sample=True,
        temperature=None if temperature is None or temperature == 1.0 else float(temperature),
        top_k=None if not top_k else int(top_k),
        top_p=None if top_p is None or top_p >= 1.0 else float(top_p),
    )


# ----------------------------------------------------------------------------- delay pattern


def codebook_delay(k: int, channels: int = 1) -> int:
    """Delay of codebook row ``k``: ``k`` for mono; ``k // 2`` for stereo, whose rows alternate
    left, right, left, ... and each left/right pair shares one delay (transformers' layout)."""
    return k // channels


def delay_pattern(prefix, batch: int, num_codebooks: int, new_frames: int, start_token: int, device, channels: int = 1):
    """The window's token grid with MusicGen's delay pattern, as transformers builds it.

    Row k is shifted right by d + 1 positions behind a start token, d =
    :func:`codebook_delay` (k for mono); positions not yet valid for a codebook
    hold ``start_token``; positions to predict hold -1.

    Args:
        prefix: int64 ``[B, K, P]`` codes kept token for token, or None.
        new_frames: frames to generate after the prefix.
        channels: the model's audio channels (2: stereo, interleaved codebooks).

    Returns:
        int64 ``[B, K, L]`` with ``L = P + new_frames + K / channels``.
    """
    import torch

    p = 0 if prefix is None else int(prefix.shape[-1])
    depth = num_codebooks // channels
    length = p + new_frames + depth
    grid = torch.full((batch, num_codebooks, length), -1, dtype=torch.long, device=device)
    for k in range(num_codebooks):
        d = codebook_delay(k, channels)
        grid[:, k, : d + 1] = start_token
        if p:
            grid[:, k, d + 1 : d + 1 + p] = prefix[:, k].to(device)
        # the tail: codebook k has no frame for the last depth-1-d positions
        grid[:, k, length - depth + 1 + d :] = start_token
    return grid


# ----------------------------------------------------------------------------- non-finite logits


class _FiniteGuard:
    """Watches every step's logits for NaN/inf without making the GPU wait each step.

    A device-side flag collects "some logit was not finite"; the logits handed on
    are made finite (NaN/inf → 0) so sampling cannot hit CUDA's device-side assert
    on a NaN probability (which would kill the process's CUDA context) before the
    flag is read. :meth:`check` reads the flag and raises.
    """

    def __init__(self, device):
        import torch

        self.device = device
        self.seen = torch.zeros((), dtype=torch.bool, device=device)
        self.every = 1 if device.type == "cpu" else FINITE_CHECK_EVERY

    def __call__(self, logits):
        import torch

        self.seen |= ~torch.isfinite(logits).all()
        return torch.nan_to_num(logits, nan=0.0, posinf=0.0, neginf=0.0)

    def check(self, step: int, force: bool = False) -> None:
        """Raise when a non-finite logit was seen (read every ``every`` steps, or when ``force``)."""
        if (force or step % self.every == 0) and bool(self.seen):
            raise GenerationError(
                "the model produced non-finite logits (NaN or inf) while generating; nothing was written "
                "for this take. Try --dtype fp32, or --backend stock"
            )


# ----------------------------------------------------------------------------- CUDA graph


class _StepGraph:
    """The T = 1 decoder step and output heads captured in one CUDA graph for a window."""

    def __init__(self, prep: _Prepared, win: _Window, rows: int, first_pos: int):
        import torch

        device = prep.device
        self.tokens = torch.full((rows, prep.num_codebooks, 1), 0, dtype=torch.long, device=device)
        self.pos = torch.tensor([first_pos], dtype=torch.long, device=device)
        self.device = device
        # torch.cuda.graph() captures on a stream of the *current* device: with --device cuda:N
        # the current device must be N, or the capture stream and the tensors disagree.
        with torch.cuda.device(device):
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            # Warm-up on a side stream (cuBLAS workspaces, SDPA kernel choice) before capture;
            # its cache writes land at first_pos, which the first real step overwrites.
            with torch.cuda.stream(side):
                for _ in range(2):
                    _logits(prep, _decoder(prep, win, self.tokens, None, self.pos)[:, -1])
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = _logits(prep, _decoder(prep, win, self.tokens, None, self.pos)[:, -1])

    def __call__(self, tokens, pos: int):
        import torch

        self.tokens.copy_(tokens)
        self.pos.fill_(pos)
        with torch.cuda.device(self.device):
            self.graph.replay()
        return self.logits


# ----------------------------------------------------------------------------- backend


class FastBackend:
    """Our decode loop (see the module docstring).

    Args:
        int8: CPU only: per-step projections in dynamic int8 (4× fewer weight bytes).
        cuda_graph: on CUDA, capture the per-step work in a CUDA graph (default True).
        native: on the CPU in fp32, use :mod:`tydust_gen.model.cpu_kernel` when it builds
            (default True); False keeps MKL, for comparisons.
    """

    def __init__(self, *, int8: bool = False, cuda_graph: bool = True, native: bool = True):
        self.int8 = int8
        self.cuda_graph = cuda_graph
        self.native = native
        self.name = "fast-int8" if int8 else "fast"
        self._prep: _Prepared | None = None
        # The model the prepared weights came from, held weakly: an id() could be reused
        # by the next model once this one is freed, a dead weak reference matches nothing.
        self._prep_model: weakref.ref | None = None

    def prepared(self, loaded: LoadedModel) -> _Prepared:
        """The model's weights arranged for the loop; built on first use and kept while this model lives."""
        weights = loaded.model.decoder.lm_heads[0].weight
        if (
            self._prep is None
            or self._prep_model is None
            or self._prep_model() is not loaded.model
            or self._prep.dtype != weights.dtype
            or self._prep.device != weights.device
        ):
            if self.int8 and loaded.device.type != "cpu":
                raise DeviceError("the int8 weight mode runs on the CPU only; use --backend fast on a GPU")
            check_supported(loaded)
            self._prep = self._prep_model = None  # drop the old weights before building new ones
            self._prep = _prepare(loaded, self.int8, self.native)
            self._prep_model = weakref.ref(loaded.model)
        return self._prep

    def _rows(self, cond: Conditioning, sampling: SamplingSettings) -> int:
        guided = sampling.guidance_scale is not None and sampling.guidance_scale > 1
        rows = int(cond.hidden.shape[0])
        if rows != (2 if guided else 1) * cond.batch_size:
            raise GenerationError(
                f"text conditioning has {rows} rows for {cond.batch_size} prompt(s); "
                "encode the text with the same guidance scale as the sampling settings"
            )
        return rows

    #: generate_window accepts ``generators=`` (one seeded stream per take).
    supports_take_generators = True

    def generate_window(self, loaded, cond, prefix, new_frames, sampling, on_step, generators=None):
        """Generate ``new_frames`` frames after ``prefix`` (see :class:`~tydust_gen.model.generate.CodeBackend`).

        With ``generators`` (one ``torch.Generator`` per take, kept across the
        windows of a track) each take samples from its own stream, so take i of a
        batch equals a single-take run seeded with that take's seed.

        Returns:
            int64 ``[B, K, new_frames]`` on ``loaded.device``.
        """
        import torch

        prep = self.prepared(loaded)
        chooser = make_chooser(loaded, sampling)
        rows = self._rows(cond, sampling)
        b, k = cond.batch_size, prep.num_codebooks
        start_token = int(loaded.model.generation_config.decoder_start_token_id)
        channels = loaded.audio_channels
        grid = delay_pattern(prefix, b, k, new_frames, start_token, loaded.device, channels)
        p = 0 if prefix is None else int(prefix.shape[-1])
        first = p + 1  # positions fed by the prefill: the start token and the prefix
        length = grid.shape[-1]
        copies = rows // b

        with torch.inference_mode():
            guard = _FiniteGuard(loaded.device)
            win = _open_window(prep, cond, length)
            tokens = grid[:, :, :first].repeat(copies, 1, 1)
            hidden = _decoder(prep, win, tokens, 0)
            logits = _logits(prep, hidden[:, -1])
            graph = None
            for pos in range(first, length):
                logits = guard(logits)
                guard.check(pos - first)
                chosen = chooser(logits, generators).view(b, k)
                column = grid[:, :, pos]
                column = torch.where(column == -1, chosen, column)
                grid[:, :, pos] = column
                on_step()
                if pos == length - 1:
                    break
                step_tokens = column.repeat(copies, 1)[:, :, None]
                if loaded.device.type == "cuda" and self.cuda_graph:
                    if graph is None:
                        graph = _StepGraph(prep, win, rows, pos)
                    logits = graph(step_tokens, pos)
                else:
                    logits = _logits(prep, _decoder(prep, win, step_tokens, pos)[:, -1])
            del graph, win
            guard.check(length, force=True)
            shift = [p + 1 + codebook_delay(i, channels) for i in range(k)]
            out = torch.stack([grid[:, i, shift[i] : shift[i] + new_frames] for i in range(k)], dim=1)
        return out

    def teacher_forced_logits(
        self, loaded: LoadedModel, cond: Conditioning, ids, *, incremental: bool = True, graph: bool = False
    ):
        """Logits for every position of given delay-masked inputs, for parity checks and the self-check.

        Args:
            ids: int64 ``[B·K, T]`` decoder inputs, as transformers' decoder takes them.
            incremental: feed one position per step through the cache (the
                decode path); False runs one prefill over all T positions.
            graph: CUDA only: position 0 eagerly, every later position by replaying a
                captured :class:`_StepGraph`, exactly as :meth:`generate_window` does.

        Returns:
            float32 ``[B'·K, T, V]``, comparable to ``model.decoder(...).logits``
            with the inputs repeated for the unconditional half.
        """
        import torch

        prep = self.prepared(loaded)
        rows = int(cond.hidden.shape[0])
        k = prep.num_codebooks
        steps = ids.shape[-1]
        tokens = ids.reshape(-1, k, steps).to(loaded.device)
        tokens = tokens.repeat(rows // tokens.shape[0], 1, 1)
        with torch.inference_mode():
            win = _open_window(prep, cond, steps)
            if not incremental:
                hidden = _decoder(prep, win, tokens, 0)
                per_pos = [_logits(prep, hidden[:, t]) for t in range(steps)]
            elif graph:
                if loaded.device.type != "cuda":
                    raise DeviceError("CUDA graphs need a CUDA device")
                per_pos = [_logits(prep, _decoder(prep, win, tokens[:, :, :1], 0)[:, -1])]
                if steps > 1:
                    step_graph = _StepGraph(prep, win, rows, 1)
                    # clone: the graph's output buffer is overwritten by the next replay
                    per_pos += [step_graph(tokens[:, :, t : t + 1], t).clone() for t in range(1, steps)]
                    del step_graph
            else:
                per_pos = [_logits(prep, _decoder(prep, win, tokens[:, :, t : t + 1], t)[:, -1]) for t in range(steps)]
        return torch.stack(per_pos, dim=1)
