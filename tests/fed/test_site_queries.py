"""The server's site queries: a scanner noise spectrum that is malformed or hostile is set
aside with its reason, the others are kept (the whole query is run in test_simulation)."""

from __future__ import annotations

import torch

from synthct.fed.site_queries import screen_noise_power

SHAPE = (8, 8, 5)


def test_malformed_or_hostile_spectra_are_set_aside_with_the_reason():
    good = torch.rand(SHAPE, dtype=torch.float64)
    nan = good.clone()
    nan[0, 0, 0] = float("nan")
    kept, rejected = screen_noise_power(
        SHAPE,
        {
            "a": (good, 12),
            "b": (torch.rand(8, 8, 8), 12),
            "c": (nan, 12),
            "d": (-good, 12),
            "e": (good, 0),
            "f": (torch.rand(SHAPE, dtype=torch.complex64), 12),
            "g": (good * 1e12, 12),  # finite, but noise no scanner makes
        },
        max_std_hu=2048.0,
    )
    assert list(kept) == ["a"] and kept["a"].cases == 12
    assert torch.equal(kept["a"].total, good)
    assert rejected == {
        "b": "spectrum shape (8, 8, 8), expected (8, 8, 5)",
        "c": "negative or non-finite power",
        "d": "negative or non-finite power",
        "e": "no cases",
        "f": "spectrum of type torch.complex64, expected real floating point",
        "g": rejected["g"],
    }
    assert rejected["g"].endswith("HU std, above 2048")
