"""Audio samples with their rate: the one audio type every stage passes on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Waveform:
    """Audio samples with their rate.

    Attributes:
        samples: float32 tensor ``[C, N]`` (channels, samples), nominally in [-1, 1].
        sample_rate: Hz.
    """

    samples: Any
    sample_rate: int

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[-1])

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate
