"""SIGINT and SIGTERM: held off around the final renames, answered at once everywhere else.

:func:`deferred` makes a short block uninterruptible by Ctrl-C and SIGTERM: a
signal that arrives inside it is recorded and delivered right after it, with
whatever disposition was in force before (``KeyboardInterrupt`` for SIGINT, the
CLI's ``Terminated`` handler for SIGTERM, death for a default SIGTERM, nothing
for an ignored one). So an interrupt cannot leave half of a new take beside
half of the old one, and is still acted on at once.

Why Python handlers and not a blocked signal mask: CPython runs signal handlers
in the main thread, but the kernel hands a process-wide signal to any thread
that does not block it. ``pthread_sigmask`` in the main thread leaves torch's
worker threads (and any Python thread) free to take SIGINT; CPython then runs
the handler in the main thread at its next bytecode and raises inside the
block. Replacing the handler itself holds the signal whichever thread takes it.

:func:`interruptible` is the other half: a Python handler only runs between
bytecodes, so one long native call (EnCodec's LSTM over a whole track is one
torch op of several seconds) would hold Ctrl-C until it returns. The call runs
in a worker thread while the main thread waits, and a wait is interrupted at
once.

Handlers can only be set from the main thread, and only the main thread gets
signal exceptions. In any other thread both helpers simply run the code: no
``KeyboardInterrupt`` can be raised there.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator, TypeVar

HELD = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))
WAIT_SLICE_S = 0.1  # s; the main thread's wait on a worker wakes this often (Windows waits are not interrupted)

T = TypeVar("T")


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def deferred(signums: tuple[int, ...] = HELD) -> Iterator[None]:
    """Hold ``signums`` (SIGINT, SIGTERM) for the block; re-deliver each one that came, in order, after it.

    Nested blocks work: an inner block re-delivers to the outer block's recorder,
    which holds it until the outermost block ends. If the block raises and a
    signal came too, the signal's exception wins (the block's is its context).
    """
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []

    def record(signum, frame) -> None:
        if signum not in pending:
            pending.append(signum)

    saved: list[tuple[int, object]] = []
    try:
        for signum in signums:
            previous = signal.getsignal(signum)
            # None: a handler set outside Python, which could not be put back; SIG_IGN: nothing to hold
            if previous is None or previous == signal.SIG_IGN:
                continue
            saved.append((signum, previous))
            signal.signal(signum, record)
        yield
    finally:
        _restore(saved)
        for signum in pending:
            # raise_signal runs the handler now in force before it returns: KeyboardInterrupt,
            # Terminated, an outer block's recorder, or (SIG_DFL) the default action.
            signal.raise_signal(signum)


def _restore(saved: list[tuple[int, object]]) -> None:
    """Put every saved handler back, even when one put back already raises (a signal after the block)."""
    if not saved:
        return
    (signum, previous), rest = saved[0], saved[1:]
    try:
        signal.signal(signum, previous)
    finally:
        _restore(rest)


def interruptible(fn: Callable[..., T], /, *args, **kwargs) -> T:
    """``fn(*args, **kwargs)``, run so that SIGINT/SIGTERM interrupt the caller at once.

    From the main thread, ``fn`` runs in a worker thread and the main thread
    waits; a signal's exception (``KeyboardInterrupt``...) is raised from the
    wait, and the worker finishes its call on its own, its result dropped
    (the CLI does not wait for it: it leaves with ``os._exit``). ``fn``'s own
    exception is re-raised here. Thread-local state (torch's
    ``inference_mode``) must be set inside ``fn``.
    """
    if not _in_main_thread():
        return fn(*args, **kwargs)
    outcome: dict[str, object] = {}
    done = threading.Event()

    def work() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller as is
            outcome["error"] = exc
        finally:
            done.set()

    name = f"tydust-{getattr(fn, '__name__', 'work')}"
    # Not a daemon: a program that goes on after the interrupt and exits normally waits for the
    # call to end rather than tearing torch down under it.
    threading.Thread(target=work, name=name).start()
    while not done.wait(WAIT_SLICE_S):
        pass
    error = outcome.pop("error", None)
    if error is not None:
        raise error  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
