"""Variations: names and seeds for several takes of one track.

``--variations N`` asks for N takes of the same prompt. This module only
decides what they are called and which seed each uses; generating them (one
batch of N identical prompts, or N separate runs) is the engine's business.

Naming: a single take keeps the track's name (``battle``), so asking for one
variation changes nothing; N > 1 takes are ``battle_v1`` .. ``battle_vN``,
1-based as people count and without zero padding up to 9 (``_v01`` appears
only when N >= 10, so names sort correctly in a file browser).

Seeds: take 1 uses the base seed itself, so ``battle_v1`` with seed 42 is the
same audio as a single ``battle`` with seed 42 when generated on its own. Take
i > 1 uses a seed derived from (base seed, i) with SHA-256: stable across
Python versions and machines (unlike ``hash()``), unrelated between takes, and
still reproducible from the one base seed written into the provenance. With no
base seed every take is unseeded (None).
"""

from __future__ import annotations

import hashlib

from tydust_gen.base.errors import SettingsError
from tydust_gen.base.settings import MAX_SEED, MAX_VARIATIONS

VARIATION_SUFFIX = "_v"  # battle_v1, battle_v2...


def _check_count(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_VARIATIONS:
        raise SettingsError(f"variations must be a whole number from 1 to {MAX_VARIATIONS}, got {n!r}")
    return n


def variation_names(track: str, n: int) -> list[str]:
    """Output base names for ``n`` takes of ``track``.

    Args:
        track: the track's name (no extension).
        n: number of takes, 1..:data:`MAX_VARIATIONS`.

    Returns:
        ``[track]`` for n == 1, else ``[track_v1, ..., track_vN]`` (zero-padded
        to the width of N).

    Raises:
        SettingsError: n out of range.
    """
    _check_count(n)
    if n == 1:
        return [track]
    width = len(str(n))
    return [f"{track}{VARIATION_SUFFIX}{i:0{width}d}" for i in range(1, n + 1)]


def variation_seed(base_seed: int | None, index: int) -> int | None:
    """Seed of take ``index`` (0-based) derived from the track's base seed.

    Args:
        base_seed: the track's seed, 0..MAX_SEED, or None (unseeded).
        index: 0-based take number; take 0 uses ``base_seed`` unchanged.

    Returns:
        A seed in 0..MAX_SEED, or None when ``base_seed`` is None.

    Raises:
        SettingsError: negative index or seed out of range.
    """
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise SettingsError(f"variation index must be a whole number >= 0, got {index!r}")
    if base_seed is None:
        return None
    if isinstance(base_seed, bool) or not isinstance(base_seed, int) or not 0 <= base_seed <= MAX_SEED:
        raise SettingsError(f"seed must be a whole number from 0 to {MAX_SEED}, got {base_seed!r}")
    if index == 0:
        return base_seed
    digest = hashlib.sha256(f"tydust-gen variation {base_seed} {index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


__all__ = ["variation_names", "variation_seed"]
