"""Generation settings: defaults, validation, and the CLI > prompt file > default precedence.

Every value a run uses is resolved here, once, into a frozen :class:`GenerationSettings`.
Values arrive as strings (from the command line) or TOML scalars (from a prompt
file) and are checked with messages that name the problem and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from tydust_gen.base.errors import SettingsError

DEFAULT_DURATION_S = 30.0  # seconds, when neither the CLI nor the prompt file gives one
MIN_DURATION_S = 0.1  # seconds
MAX_DURATION_S = 600.0  # seconds; 10 minutes is ~30,000 decoding steps, hours on a CPU
DEFAULT_WINDOW_S = 30.0  # seconds, the span MusicGen was trained on
DEFAULT_STRIDE_S = 18.0  # seconds; each new window keeps the last 12 s as context (audiocraft's extend_stride)

DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_K = 250
DEFAULT_TOP_P = 0.0  # 0 means "off", not greedy
DEFAULT_GUIDANCE_SCALE = 3.0
BACKEND_NAMES = ("fast", "fast-int8", "stock")  # see backends.py
DEFAULT_BACKEND = "fast"
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingSettings:
    """How each next token is chosen (audiocraft's defaults).

    Attributes:
        do_sample: sample from the distribution; False means greedy (argmax).
        temperature: > 0; divides the logits before sampling.
        top_k: keep the k most likely tokens; 0 disables it.
        top_p: nucleus sampling when > 0; 0.0 means *off*. As in audiocraft, a
            positive top_p takes precedence and top_k is then not applied.
        guidance_scale: classifier-free guidance weight; <= 1 disables guidance.
    """

    do_sample: bool = True
    temperature: float = DEFAULT_TEMPERATURE
    top_k: int = DEFAULT_TOP_K
    top_p: float = DEFAULT_TOP_P
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE


@dataclass(frozen=True)
class GenerationSettings:
    """Everything that decides the tokens of one track, with units.

    Attributes:
        duration_s: length of the finished track in seconds.
        seed: RNG seed (None: not reproducible).
        window_s: longest span generated in one pass, seconds.
        stride_s: how far each further window advances, seconds; the
            remaining ``window_s - stride_s`` seconds are re-fed as context.
        sampling: token sampling parameters.
        backend: decode loop ("fast", "fast-int8" or "stock", see backends.py);
            fast and stock give the same tokens in fp32, fast-int8 does not.
    """

    duration_s: float = DEFAULT_DURATION_S
    seed: int | None = None
    window_s: float = DEFAULT_WINDOW_S
    stride_s: float = DEFAULT_STRIDE_S
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    backend: str = DEFAULT_BACKEND


#: Keys a prompt file or the CLI may set, mapped to their parser.
def _parse_float(name: str, value: Any, flag: str) -> float:
    if isinstance(value, bool):
        raise SettingsError(f"{name} must be a number, got {value!r}; e.g. {flag} 1.0")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name} {value!r} is not a number; e.g. {flag} 1.0") from None
    if not math.isfinite(number):
        raise SettingsError(f"{name} must be a finite number, got {value!r}")
    return number


def _parse_int(name: str, value: Any, flag: str) -> int:
    if isinstance(value, bool):
        raise SettingsError(f"{name} must be a whole number, got {value!r}; e.g. {flag} 42")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise SettingsError(f"{name} {value!r} is not a whole number; e.g. {flag} 42") from None


def parse_duration(value: Any) -> float:
    """Seconds as a float in [MIN_DURATION_S, MAX_DURATION_S]; raises SettingsError otherwise."""
    duration = _parse_float("duration", value, "--duration")
    if duration <= 0:
        raise SettingsError(f"duration must be more than 0 seconds, got {value!r}; e.g. --duration 90")
    if duration < MIN_DURATION_S:
        raise SettingsError(f"duration {value!r} is too short; the minimum is {MIN_DURATION_S:g} s")
    if duration > MAX_DURATION_S:
        raise SettingsError(
            f"duration {value!r} is above the maximum of {MAX_DURATION_S:g} s; generate shorter tracks"
        )
    return duration


def parse_seed(value: Any) -> int:
    seed = _parse_int("seed", value, "--seed")
    if not 0 <= seed <= MAX_SEED:
        raise SettingsError(f"seed must be between 0 and {MAX_SEED}, got {value!r}")
    return seed


def parse_temperature(value: Any) -> float:
    t = _parse_float("temperature", value, "--temperature")
    if t <= 0:
        raise SettingsError(f"temperature must be more than 0, got {value!r}; use --greedy for argmax decoding")
    return t


def parse_top_k(value: Any) -> int:
    k = _parse_int("top_k", value, "--top-k")
    if k < 0:
        raise SettingsError(f"top_k must be 0 (off) or positive, got {value!r}")
    return k


def parse_top_p(value: Any) -> float:
    p = _parse_float("top_p", value, "--top-p")
    if not 0.0 <= p <= 1.0:
        raise SettingsError(f"top_p must be between 0.0 (off) and 1.0, got {value!r}")
    return p


def parse_guidance(value: Any) -> float:
    g = _parse_float("guidance_scale", value, "--guidance")
    if g < 0:
        raise SettingsError(f"guidance_scale must be 0 or more (1.0 or less turns guidance off), got {value!r}")
    return g


def parse_window(value: Any) -> float:
    w = _parse_float("window", value, "--window")
    if w <= 0:
        raise SettingsError(f"window must be more than 0 seconds, got {value!r}; e.g. --window 30")
    return w


def parse_stride(value: Any) -> float:
    s = _parse_float("stride", value, "--stride")
    if s <= 0:
        raise SettingsError(f"stride must be more than 0 seconds, got {value!r}; e.g. --stride 18")
    return s


def parse_bool(name: str):
    """A parser for a true/false setting (prompt files only: CLI flags are already booleans)."""

    def parse(value: Any) -> bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{name} must be true or false, got {value!r}")
        return value

    return parse


def _merge(cli: Mapping[str, Any], prompt_file: Mapping[str, Any], parsers: Mapping[str, Any]) -> dict[str, Any]:
    """Values by precedence: a CLI value (parsed here) beats the prompt file's (already parsed)."""
    merged: dict[str, Any] = {}
    for key, parser in parsers.items():
        raw = cli.get(key)
        if raw is not None:
            merged[key] = parser(raw)
        elif key in prompt_file:
            merged[key] = prompt_file[key]
    return merged


def parse_backend(value: Any) -> str:
    name = str(value).strip().lower()
    if name not in BACKEND_NAMES:
        raise SettingsError(f"unknown backend {value!r}; use one of: {', '.join(BACKEND_NAMES)}")
    return name


#: Setting name -> parser. These are the keys a prompt file may carry besides its metadata.
SETTING_PARSERS = {
    "duration": parse_duration,
    "seed": parse_seed,
    "temperature": parse_temperature,
    "top_k": parse_top_k,
    "top_p": parse_top_p,
    "guidance_scale": parse_guidance,
    "window": parse_window,
    "stride": parse_stride,
    "do_sample": parse_bool("do_sample"),
    "backend": parse_backend,
}


def resolve_settings(cli: Mapping[str, Any], prompt_file: Mapping[str, Any]) -> GenerationSettings:
    """Merge settings with precedence CLI flag > prompt file > built-in default.

    Args:
        cli: raw values from the command line (None = not given).
        prompt_file: already-parsed values from the track's prompt file.

    Raises:
        SettingsError: a value is malformed or the combination is impossible.
    """
    merged = _merge(cli, prompt_file, SETTING_PARSERS)
    window = merged.get("window", DEFAULT_WINDOW_S)
    stride = merged.get("stride", DEFAULT_STRIDE_S)
    if stride >= window:
        raise SettingsError(
            f"stride ({stride:g} s) must be shorter than the window ({window:g} s) so windows overlap; "
            f"e.g. --window 30 --stride 18"
        )
    sampling = SamplingSettings(
        do_sample=merged.get("do_sample", True),
        temperature=merged.get("temperature", DEFAULT_TEMPERATURE),
        top_k=merged.get("top_k", DEFAULT_TOP_K),
        top_p=merged.get("top_p", DEFAULT_TOP_P),
        guidance_scale=merged.get("guidance_scale", DEFAULT_GUIDANCE_SCALE),
    )
    return GenerationSettings(
        duration_s=merged.get("duration", DEFAULT_DURATION_S),
        seed=merged.get("seed"),
        window_s=window,
        stride_s=stride,
        sampling=sampling,
        backend=merged.get("backend", DEFAULT_BACKEND),
    )


# ----------------------------------------------------------------- continuation (issue 12)

DEFAULT_CONTEXT_S = 10.0  # seconds of the continued track's tail fed to the first window
MAX_CONTEXT_S = 20.0  # seconds; more leaves too little of a 30 s window for new music


def parse_context(value: Any) -> float:
    s = _parse_float("context", value, "--context")
    if not 0 < s <= MAX_CONTEXT_S:
        raise SettingsError(
            f"context must be more than 0 and at most {MAX_CONTEXT_S:g} seconds, got {value!r}; e.g. --context 10"
        )
    return s


def parse_continue_from(value: Any) -> str:
    """A prompt file's ``continue_from``: the name of the track whose finished output this one continues."""
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(f'continue_from must name another track, got {value!r}; e.g. continue_from = "phase3_combat"')
    return value.strip()


def parse_melody(value: Any) -> str:
    """A prompt file's ``melody``: the audio file whose tune the track follows (relative to the prompt file's folder)."""
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(f'melody must name an audio file, got {value!r}; e.g. melody = "themes/boss.ogg"')
    return value.strip()


#: Keys that steer a track with audio (prompt files; the CLI has --continue-from FILE, --context and --melody FILE).
CONDITIONING_PARSERS = {
    "continue_from": parse_continue_from,
    "context": parse_context,
    "melody": parse_melody,
}


# ----------------------------------------------------------------- mastering (issue 4)

DEFAULT_LOUDNESS_LUFS = -14.0  # LUFS integrated (BS.1770); None turns normalisation off
DEFAULT_TRUE_PEAK_DBTP = -1.0  # dBTP, measured on the decoded MP3 and OGG
MIN_LOUDNESS_LUFS = -70.0  # LUFS; quieter targets are silence for all practical purposes
MAX_VARIATIONS = 99  # takes per track in one command
MAX_BARS = 256  # bars in one loop (8 minutes at 128 bpm)
DEFAULT_METER = "4/4"
METER_UNITS = (2, 4, 8, 16)  # note values a meter's beat may have
MAX_METER_BEATS = 16  # numerator of the longest meter accepted (e.g. 15/8)
MIN_BPM = 1.0  # the prompt file's bpm range, also for --bpm
MAX_BPM = 999.0
_OFF_WORDS = {"off", "none", "no", "false"}


@dataclass(frozen=True)
class MasteringSettings:
    """How generated audio is made game-ready.

    Attributes:
        loudness_lufs: integrated loudness target, LUFS; None = leave loudness alone
            (peaks above the ceiling are still brought down).
        true_peak_dbtp: ceiling for the true peak of the *encoded* files, dBTP.
        fade_in_s: equal-power fade-in length, seconds (0 = none).
        fade_out_s: equal-power fade-out length, seconds (0 = none).
        loop: make a seamless loop (no fades allowed): a whole number of bars
            near the duration when the music has a clear beat, else exactly the duration.
        variations: takes generated in one batch (1 = a single take).
        preview: also write ``NAME.png`` (waveform + spectrogram).
        bars: exact number of bars in the loop (None: the whole number nearest the duration).
        meter: time signature, ``"4/4"``; :func:`beats_per_bar` gives the beats a bar holds.
    """

    loudness_lufs: float | None = DEFAULT_LOUDNESS_LUFS
    true_peak_dbtp: float = DEFAULT_TRUE_PEAK_DBTP
    fade_in_s: float = 0.0
    fade_out_s: float = 0.0
    loop: bool = False
    variations: int = 1
    preview: bool = False
    bars: int | None = None
    meter: str = DEFAULT_METER


def parse_loudness(value: Any) -> float | None:
    if isinstance(value, str) and value.strip().lower() in _OFF_WORDS:
        return None
    lufs = _parse_float("loudness", value, "--loudness")
    if not MIN_LOUDNESS_LUFS <= lufs <= 0:
        raise SettingsError(f"loudness must be between {MIN_LOUDNESS_LUFS:g} and 0 LUFS (or 'off'), got {value!r}; e.g. --loudness -14")
    return lufs


def parse_true_peak(value: Any) -> float:
    dbtp = _parse_float("true_peak", value, "--true-peak")
    if not -20.0 <= dbtp <= 0.0:
        raise SettingsError(f"true_peak must be between -20 and 0 dBTP, got {value!r}; e.g. --true-peak -1")
    return dbtp


def _parse_fade(name: str, flag: str):
    def parse(value: Any) -> float:
        seconds = _parse_float(name, value, flag)
        if seconds < 0:
            raise SettingsError(f"{name} must be 0 or more seconds, got {value!r}")
        return seconds

    return parse


def parse_variations(value: Any) -> int:
    n = _parse_int("variations", value, "--variations")
    if not 1 <= n <= MAX_VARIATIONS:
        raise SettingsError(f"variations must be between 1 and {MAX_VARIATIONS}, got {value!r}")
    return n


def parse_bars(value: Any) -> int:
    n = _parse_int("bars", value, "--bars")
    if not 1 <= n <= MAX_BARS:
        raise SettingsError(f"bars must be between 1 and {MAX_BARS}, got {value!r}; e.g. --bars 8")
    return n


def parse_meter(value: Any) -> str:
    """A time signature ``"N/D"`` (e.g. ``4/4``, ``3/4``, ``6/8``), normalised; raises SettingsError otherwise."""
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    top, slash, bottom = text.partition("/")
    if not (slash and top.strip().isdigit() and bottom.strip().isdigit()):
        raise SettingsError(f"meter must be a time signature like 4/4, 3/4 or 6/8, got {value!r}")
    beats, unit = int(top), int(bottom)
    if not 1 <= beats <= MAX_METER_BEATS or unit not in METER_UNITS:
        raise SettingsError(
            f"meter {value!r} is not one we can loop: use 1 to {MAX_METER_BEATS} beats of a "
            f"{', '.join(map(str, METER_UNITS))} note, e.g. 4/4"
        )
    return f"{beats}/{unit}"


def beats_per_bar(meter: str) -> int:
    """Beats a beat tracker counts in one bar of ``meter``.

    Simple meters count their numerator (4/4: 4, 3/4: 3, 7/8: 7); compound
    meters in eighths or sixteenths (6/8, 9/8, 12/8, 12/16) are felt in dotted
    beats, three of the written notes each (6/8: 2, 12/8: 4).
    """
    beats, unit = (int(v) for v in parse_meter(meter).split("/"))
    if unit >= 8 and beats % 3 == 0 and beats > 3:
        return beats // 3
    return beats


def parse_bpm(value: Any) -> float:
    bpm = _parse_float("bpm", value, "--bpm")
    if not MIN_BPM <= bpm <= MAX_BPM:
        raise SettingsError(f"bpm must be between {MIN_BPM:g} and {MAX_BPM:g}, got {value!r}; e.g. --bpm 120")
    return bpm


#: Mastering keys a prompt file may carry (same names as the CLI flags, with underscores).
MASTERING_PARSERS = {
    "loudness": parse_loudness,
    "true_peak": parse_true_peak,
    "fade_in": _parse_fade("fade_in", "--fade-in"),
    "fade_out": _parse_fade("fade_out", "--fade-out"),
    "loop": parse_bool("loop"),
    "variations": parse_variations,
    "preview": parse_bool("preview"),
    "bars": parse_bars,
    "meter": parse_meter,
}


def resolve_mastering(cli: Mapping[str, Any], prompt_file: Mapping[str, Any], duration_s: float) -> MasteringSettings:
    """Merge mastering settings (CLI > prompt file > default) and check they fit a track of ``duration_s``."""
    merged = _merge(cli, prompt_file, MASTERING_PARSERS)
    m = MasteringSettings(
        loudness_lufs=merged.get("loudness", DEFAULT_LOUDNESS_LUFS),
        true_peak_dbtp=merged.get("true_peak", DEFAULT_TRUE_PEAK_DBTP),
        fade_in_s=merged.get("fade_in", 0.0),
        fade_out_s=merged.get("fade_out", 0.0),
        loop=merged.get("loop", False),
        variations=merged.get("variations", 1),
        preview=merged.get("preview", False),
        bars=merged.get("bars"),
        meter=merged.get("meter", DEFAULT_METER),
    )
    if m.bars is not None and not m.loop:
        raise SettingsError("bars sets the length of a loop; add --loop (or loop = true in the prompt file), or drop --bars")
    if m.loop and (m.fade_in_s or m.fade_out_s):
        raise SettingsError("a loop cannot fade in or out (the fade would be heard at every repeat); drop --fade-in/--fade-out or --loop")
    if m.fade_in_s + m.fade_out_s > duration_s:
        raise SettingsError(
            f"fades of {m.fade_in_s:g} s + {m.fade_out_s:g} s are longer than the {duration_s:g} s track; shorten them"
        )
    if m.loop and duration_s < 2.0:
        raise SettingsError(f"a loop needs at least 2 s (got {duration_s:g} s); use a longer --duration")
    if m.loudness_lufs is not None and m.loudness_lufs > m.true_peak_dbtp:
        raise SettingsError(
            f"loudness {m.loudness_lufs:g} LUFS above the {m.true_peak_dbtp:g} dBTP ceiling can't be reached; lower --loudness"
        )
    return m
