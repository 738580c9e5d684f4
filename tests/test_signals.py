"""The signal hold around the final renames, and waits that Ctrl-C interrupts, with other threads running.

The hold is tested the way it fails in a real run: worker threads (Python threads and torch's
intra-op pool) are alive, so the kernel may hand SIGINT to any of them, and the signal arrives
*inside* the held block. A wakeup fd tells the test when the signal has been taken, by whichever
thread, so the rest of the block runs after that: no sleeps.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO

from tydust_gen.base import signals

RENAMES = 3


class Workers:
    """Python threads spinning in bytecode plus a thread keeping torch's matmul pool busy."""

    def __init__(self, python_threads: int = 3):
        import torch

        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._spin, daemon=True) for _ in range(python_threads)]
        a = torch.randn(192, 192)
        self.threads.append(threading.Thread(target=self._matmul, args=(torch, a), daemon=True))
        self.started = threading.Barrier(len(self.threads) + 1)

    def _spin(self) -> None:
        self.started.wait()
        n = 0
        while not self.stop.is_set():
            n += sum(range(200))

    def _matmul(self, torch, a) -> None:
        self.started.wait()
        while not self.stop.is_set():
            torch.mm(a, a)

    def __enter__(self) -> "Workers":
        for t in self.threads:
            t.start()
        self.started.wait()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


class Wakeup:
    """``signal.set_wakeup_fd``: CPython's C handler writes the signal number there, from any thread."""

    def __enter__(self) -> "Wakeup":
        self.r, self.w = os.pipe()
        os.set_blocking(self.w, False)
        self.old = signal.set_wakeup_fd(self.w)
        return self

    def taken(self, timeout: float = 30.0) -> int:
        """Wait until a signal has been taken by some thread; return its number."""
        ready, _, _ = select.select([self.r], [], [], timeout)
        assert ready, "the signal was never taken"
        return os.read(self.r, 1)[0]

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self.old)
        os.close(self.r)
        os.close(self.w)


def renames(folder: Path, done: list[str]) -> None:
    """The body of a commit: a few renames, with bytecode in between where a handler could run."""
    for i in range(RENAMES):
        os.replace(folder / f"staged{i}", folder / f"final{i}")
        done.append(f"final{i}")
        sum(range(10_000))


def staged(folder: Path) -> Path:
    for i in range(RENAMES):
        (folder / f"staged{i}").write_text(str(i))
    return folder


def send(how: str, sig: int, workers: Workers) -> None:
    if how == "process":
        os.kill(os.getpid(), sig)  # the kernel picks a thread; the main thread holds, so a worker may
    else:
        signal.pthread_kill(workers.threads[0].ident, sig)  # straight to a worker thread


@pytest.mark.parametrize("how", ["process", "worker-thread"])
def test_sigint_inside_hold_waits_for_the_block(tmp_path, how):
    folder = staged(tmp_path)
    done: list[str] = []
    body_finished = False
    with Workers() as workers, Wakeup() as wakeup:
        with pytest.raises(KeyboardInterrupt):
            with signals.deferred():
                send(how, signal.SIGINT, workers)
                assert wakeup.taken() == signal.SIGINT
                renames(folder, done)
                body_finished = True
    assert body_finished and done == [f"final{i}" for i in range(RENAMES)]
    assert sorted(p.name for p in folder.iterdir()) == [f"final{i}" for i in range(RENAMES)]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class Terminated(BaseException):
    """What the CLI's SIGTERM handler raises."""


def test_sigterm_inside_hold_runs_the_previous_handler_after_it(tmp_path):
    folder = staged(tmp_path)
    done: list[str] = []
    calls: list[int] = []

    def on_sigterm(signum, frame):
        calls.append(signum)
        raise Terminated()

    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with Workers() as workers, Wakeup() as wakeup:
            with pytest.raises(Terminated):
                with signals.deferred():
                    send("worker-thread", signal.SIGTERM, workers)
                    assert wakeup.taken() == signal.SIGTERM
                    renames(folder, done)
                    assert calls == []  # not yet
        assert calls == [signal.SIGTERM] and len(done) == RENAMES
        assert signal.getsignal(signal.SIGTERM) is on_sigterm
    finally:
        signal.signal(signal.SIGTERM, old)


def test_nested_holds_deliver_after_the_outermost(tmp_path):
    folder = staged(tmp_path)
    done: list[str] = []
    after_inner = False
    with Workers() as workers, Wakeup() as wakeup:
        with pytest.raises(KeyboardInterrupt):
            with signals.deferred():
                with signals.deferred():
                    send("process", signal.SIGINT, workers)
                    assert wakeup.taken() == signal.SIGINT
                after_inner = True  # the inner block's end re-delivers to the outer block's recorder
                renames(folder, done)
    assert after_inner and len(done) == RENAMES
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_both_signals_inside_hold_first_one_wins(tmp_path):
    def on_sigterm(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        with Wakeup() as wakeup:
            with pytest.raises(Terminated):
                with signals.deferred():
                    os.kill(os.getpid(), signal.SIGTERM)
                    assert wakeup.taken() == signal.SIGTERM
                    os.kill(os.getpid(), signal.SIGINT)
                    assert wakeup.taken() == signal.SIGINT
        # both handlers are back, and nothing is left to fire later
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) is on_sigterm
    finally:
        signal.signal(signal.SIGTERM, old)


def test_ignored_signal_stays_ignored():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGINT)
        sum(range(10_000))  # bytecode where a pending handler would run
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_hold_in_another_thread_runs_the_block(tmp_path):
    folder = staged(tmp_path)
    done: list[str] = []
    errors: list[BaseException] = []

    def body():
        try:
            with signals.deferred():
                renames(folder, done)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert not errors and len(done) == RENAMES
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


DEFAULT_SIGTERM_SCRIPT = """
import os, signal, sys
from pathlib import Path
from tydust_gen.base import signals
signal.signal(signal.SIGTERM, signal.SIG_DFL)
out = Path(sys.argv[1])
with signals.deferred():
    os.kill(os.getpid(), signal.SIGTERM)
    sum(range(100_000))
    out.write_text("body finished")
out.write_text("after the block")
"""


def test_default_sigterm_kills_right_after_the_block(tmp_path):
    marker = tmp_path / "marker"
    proc = subprocess.run(
        [sys.executable, "-c", DEFAULT_SIGTERM_SCRIPT, str(marker)],
        env={**os.environ, "PYTHONPATH": str(REPO / "src")}, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    assert marker.read_text() == "body finished"


# --- interruptible: a long call in a worker, a wait that Ctrl-C ends ----------------------------


def test_interruptible_returns_and_raises_like_the_call():
    assert signals.interruptible(lambda a, b=0: a + b, 2, b=3) == 5
    with pytest.raises(ZeroDivisionError):
        signals.interruptible(lambda: 1 / 0)


def test_sigint_interrupts_the_wait_not_the_call():
    """The call is stuck (as in a long native op); SIGINT ends the wait at once, the call ends on its own."""
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()

    def stuck():
        entered.set()
        release.wait()
        finished.set()
        return "late"

    def interrupt():
        entered.wait()
        os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=interrupt)
    sender.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            signals.interruptible(stuck)
        assert not finished.is_set()
    finally:
        release.set()
        sender.join()
    worker = [t for t in threading.enumerate() if t.name == "tydust-stuck"]
    for t in worker:
        t.join()
    assert finished.is_set()


def _long_lstm_codec():
    """An EnCodec whose LSTM (2 × 512 units; musicgen-small's has 1024) dominates; its convolutions are small."""
    import torch
    from transformers import EncodecConfig, EncodecModel

    cfg = EncodecConfig(
        sampling_rate=100, audio_channels=1, hidden_size=16, num_filters=256, upsampling_ratios=[2],
        codebook_size=64, codebook_dim=16, num_lstm_layers=2, num_residual_layers=1, target_bandwidths=[1.2],
        use_conv_shortcut=False, normalize=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return EncodecModel(cfg).eval()


def test_decode_answers_sigint_during_encodec_lstm():
    """EnCodec decode of a whole track: SIGINT during its LSTM (one torch call) is answered before the LSTM ends.

    The bound is relative to the LSTM's own duration (measured here), so machine load does not
    matter: before the fix the interrupt waited for the whole call.
    """
    from types import SimpleNamespace

    import torch

    from tydust_gen.model.generate import decode_codes

    codec = _long_lstm_codec()
    lstm = codec.decoder.layers[1].lstm
    marks: dict[str, float] = {}
    in_lstm = threading.Event()

    def before(module, args):
        marks["lstm_start"] = time.perf_counter()
        in_lstm.set()

    def after(module, args, output):
        marks["lstm_end"] = time.perf_counter()

    lstm.register_forward_pre_hook(before)
    lstm.register_forward_hook(after)
    frames = 1500
    codes = torch.randint(0, 64, (1, 4, frames))
    loaded = SimpleNamespace(model=SimpleNamespace(audio_encoder=codec), sample_rate=100, frame_rate=50, audio_channels=1)

    def interrupt():
        in_lstm.wait()
        marks["signal"] = time.perf_counter()
        os.kill(os.getpid(), signal.SIGINT)

    sender = threading.Thread(target=interrupt)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two OpenMP threads on a busy 2-core machine make the LSTM 10x slower
    sender.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            decode_codes(loaded, codes)
        marks["interrupted"] = time.perf_counter()
    finally:
        sender.join()
        torch.set_num_threads(threads)
    for t in threading.enumerate():
        if t.name.startswith("tydust-"):
            t.join()  # the abandoned decode ends on its own
    latency = marks["interrupted"] - marks["signal"]
    # before the fix the LSTM ran in this thread and the interrupt came as it returned, before its hook
    lstm_s = marks.get("lstm_end", marks["interrupted"]) - marks["lstm_start"]
    assert latency < lstm_s / 3, f"answered SIGINT after {latency:.2f} s; the LSTM call took {lstm_s:.2f} s"
