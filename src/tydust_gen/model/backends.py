"""Choosing how tokens are decoded: the names the CLI offers and the backend each one builds.

=============  ==========================================================================
``fast``       :class:`~tydust_gen.model.fast.FastBackend`, our decode loop (the default):
               same tokens as ``stock`` in fp32, CUDA graph + fp16 on a GPU.
``fast-int8``  the same loop with int8 weights, CPU only: about twice the speed of
               ``stock`` on a CPU, at a small measured quality cost.
``stock``      :class:`~tydust_gen.model.stock.StockBackend`, transformers' own ``generate``.
=============  ==========================================================================

Commands build them with ``self_check=True``: a self-check against transformers on first
use, with a fallback ladder (:mod:`tydust_gen.model.selfcheck`).
"""

from __future__ import annotations

from typing import Callable

from tydust_gen.base.errors import SettingsError
from tydust_gen.base.settings import BACKEND_NAMES, DEFAULT_BACKEND  # noqa: F401  (re-exported)
from tydust_gen.model.generate import CodeBackend
from tydust_gen.model.stock import StockBackend


def make_backend(name: str, *, self_check: bool = False, warn: Callable[[str], None] | None = None) -> CodeBackend:
    """Build the backend called ``name`` (one of :data:`BACKEND_NAMES`).

    Args:
        self_check: wrap it in :class:`~tydust_gen.model.selfcheck.CheckedBackend`, which compares its
            step with transformers on first use and falls back (CUDA graph → eager → stock) when
            it disagrees; ``warn`` hears the one line that says so.

    Raises:
        SettingsError: an unknown name.
    """
    from tydust_gen.model.fast import FastBackend

    choice = name.strip().lower()
    if choice not in BACKEND_NAMES:
        raise SettingsError(f"unknown backend {name!r}; use one of: {', '.join(BACKEND_NAMES)}")
    if self_check:
        from tydust_gen.model.selfcheck import CheckedBackend

        return CheckedBackend(choice, warn=warn)
    if choice == "fast":
        return FastBackend()
    if choice == "fast-int8":
        return FastBackend(int8=True)
    if choice == "stock":
        return StockBackend()
    raise SettingsError(f"unknown backend {name!r}; use one of: {', '.join(BACKEND_NAMES)}")
