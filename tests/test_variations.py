"""Variation names and seeds."""

from __future__ import annotations

import pytest

from tydust_gen.base.errors import SettingsError
from tydust_gen.base.settings import MAX_SEED
from tydust_gen.base.variations import variation_names, variation_seed


def test_names():
    assert variation_names("battle", 1) == ["battle"]
    assert variation_names("battle", 3) == ["battle_v1", "battle_v2", "battle_v3"]
    names = variation_names("battle", 12)
    assert names[0] == "battle_v01" and names[-1] == "battle_v12" and names == sorted(names)


@pytest.mark.parametrize("n", [0, -1, 100, 2.0, True])
def test_bad_counts(n):
    with pytest.raises(SettingsError):
        variation_names("battle", n)


def test_seeds():
    assert variation_seed(42, 0) == 42
    seeds = [variation_seed(42, i) for i in range(10)]
    assert len(set(seeds)) == 10 and all(0 <= s <= MAX_SEED for s in seeds)
    assert seeds == [variation_seed(42, i) for i in range(10)]  # stable
    assert variation_seed(43, 1) != variation_seed(42, 1)
    assert variation_seed(None, 3) is None
    with pytest.raises(SettingsError):
        variation_seed(42, -1)
    with pytest.raises(SettingsError):
        variation_seed(-5, 1)
