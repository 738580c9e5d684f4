"""Test hooks: where fault-injection tests reach into a real run.

Nothing here changes behaviour unless an environment variable asks for it:

* ``TYDUST_TEST_HOOK=STAGE[:N][@K]`` — (the K-th time) when the run reaches ``STAGE``
  (``loading``; ``generate`` after N decoding steps; ``decode`` before EnCodec;
  ``master`` before the mastering of a take; ``encode`` between the MP3 and the
  OGG; ``commit`` just before files move into place; ``commit-held`` after the
  first of those renames, inside the signal hold) it prints
  ``tydust-test-hook: STAGE`` on stderr and waits: until the file named by
  ``TYDUST_TEST_HOOK_GO`` exists, else ``TYDUST_TEST_HOOK_SLEEP`` seconds
  (default 60; 0 marks the stage without stopping, so a signal lands in the
  stage's own work). The wait is interruptible, so a test knows where the
  process is when it sends a signal.
* ``TYDUST_TEST_FAULT=enospc:FMT`` — the write of output ``FMT`` (mp3, ogg or
  json) fails as a full disk does (``OSError(ENOSPC)``) after leaving a partial file.

Signals themselves (the hold around the renames) are :mod:`tydust_gen.base.signals`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from pathlib import Path

HOOK_ENV = "TYDUST_TEST_HOOK"
HOOK_GO_ENV = "TYDUST_TEST_HOOK_GO"
HOOK_SLEEP_ENV = "TYDUST_TEST_HOOK_SLEEP"
FAULT_ENV = "TYDUST_TEST_FAULT"
HOOK_MARKER = "tydust-test-hook:"
HOOK_POLL_S = 0.02  # seconds between checks of the go file
_seen: dict[str, int] = {}


def hook(stage: str, count: int | None = None) -> None:
    """Pause at ``stage`` when ``TYDUST_TEST_HOOK`` names it (and ``count`` reached its N)."""
    want = os.environ.get(HOOK_ENV)
    if not want:
        return
    want, _, nth = want.partition("@")
    name, _, n = want.partition(":")
    if name != stage:
        return
    if n and count != int(n):
        return
    _seen[want] = _seen.get(want, 0) + 1
    if nth and _seen[want] != int(nth):
        return
    sys.stderr.write(f"{HOOK_MARKER} {want}\n")
    sys.stderr.flush()
    go = os.environ.get(HOOK_GO_ENV)
    deadline = time.monotonic() + float(os.environ.get(HOOK_SLEEP_ENV, "60"))
    while time.monotonic() < deadline:
        if go and Path(go).exists():
            return
        time.sleep(HOOK_POLL_S)


def step_hooked(progress):
    """Wrap a progress callback so ``TYDUST_TEST_HOOK=generate:N`` pauses after step N."""
    if not os.environ.get(HOOK_ENV, "").startswith("generate"):
        return progress

    def wrapped(done: int, total: int) -> None:
        hook("generate", done)
        if progress is not None:
            progress(done, total)

    return wrapped


def maybe_fail_write(fmt: str, path: Path) -> None:
    """Simulate a full disk while writing output ``fmt`` (see ``TYDUST_TEST_FAULT``)."""
    if os.environ.get(FAULT_ENV) != f"enospc:{fmt}":
        return
    with contextlib.suppress(OSError):
        with open(path, "ab") as f:
            f.write(b"\0" * 100)  # a partial file, as a real full disk leaves
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
