"""Model loading: the hub's download progress shows on a terminal only, the core stays silent.

No download can happen offline, so these tests look at what the hub's progress bars
would do at the moment the weights are fetched: ``from_pretrained`` is wrapped to
record ``huggingface_hub``'s progress-bar state when it is called.
"""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.utils import are_progress_bars_disabled
from transformers import MusicgenForConditionalGeneration

from tydust_gen.model import loading


@pytest.fixture
def bars_during_load(monkeypatch) -> list[bool]:
    """Whether the hub's progress bars were disabled at each ``from_pretrained`` of the model."""
    seen: list[bool] = []
    real = MusicgenForConditionalGeneration.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        seen.append(are_progress_bars_disabled())
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(MusicgenForConditionalGeneration, "from_pretrained", classmethod(recording))
    return seen


def test_core_is_silent_unless_asked(tiny_model_dir, bars_during_load):
    source = loading.resolve_source(str(tiny_model_dir))
    loading.load_model(source, torch.device("cpu"))
    loading.load_model(source, torch.device("cpu"), show_download_progress=True)
    assert bars_during_load == [True, False]
    assert are_progress_bars_disabled()  # off again once the model is loaded


def test_progress_bars_off_again_after_a_failed_load(tmp_path, bars_during_load):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(loading.ModelError):
        loading.load_model(loading.resolve_source(str(tmp_path)), torch.device("cpu"), show_download_progress=True)
    assert bars_during_load == [False] and are_progress_bars_disabled()


@pytest.mark.parametrize(
    ("env", "args", "disabled"),
    [
        ({}, [], True),  # piped (the test runner's stderr is not a terminal)
        ({"TTY_COMPATIBLE": "1"}, [], False),  # a terminal
        ({"TTY_COMPATIBLE": "1"}, ["--quiet"], True),  # a terminal, but --quiet
    ],
    ids=["piped", "terminal", "terminal-quiet"],
)
def test_cli_shows_download_progress_on_a_terminal_only(workdir, run_cli, bars_during_load, env, args, disabled):
    result = run_cli("game_over", "-d", "0.2", "-o", "out", *args, env=env)
    assert result.exit_code == 0, result.stderr
    assert bars_during_load == [disabled]
    assert are_progress_bars_disabled()
