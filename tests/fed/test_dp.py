"""The classifiers' central DP: clipped, equal-weight, noised, accounted releases."""

from __future__ import annotations

import math

import pytest
import torch

from synthct.fed.dp import ClassifierDP


def _dp(
    smoke_config, noise: float = 1.0, clip: float = 1.0, not_covered: tuple[str, ...] = ()
) -> ClassifierDP:
    privacy = smoke_config.federated.privacy.model_copy(
        update={"enabled": True, "noise_multiplier": noise, "clipping_norm": clip}
    )
    fed = smoke_config.federated.model_copy(update={"privacy": privacy})
    config = smoke_config.model_copy(update={"federated": fed})
    return ClassifierDP(config, "downstream", list(not_covered))


def test_updates_are_clipped_and_integer_buffers_stay_as_sent(smoke_config):
    dp = _dp(smoke_config, noise=1e-6, clip=1.0)  # noise too small to matter here
    sent = {"w": torch.zeros(4), "n": torch.tensor(7)}
    big = {"w": torch.tensor([30.0, 40.0, 0.0, 0.0]), "n": torch.tensor(99)}  # norm 50
    small = {"w": torch.tensor([0.0, 0.0, 0.3, 0.4]), "n": torch.tensor(11)}  # norm 0.5
    out = dp.release(sent, [big, small])
    # mean of (big clipped to norm 1) and small: ([0.6, 0.8, 0, 0] + [0, 0, 0.3, 0.4]) / 2
    torch.testing.assert_close(out["w"], torch.tensor([0.3, 0.4, 0.15, 0.2]), atol=1e-4, rtol=0)
    assert int(out["n"]) == 7 and int(sent["n"]) == 7


def test_noise_has_flowers_std_and_every_release_is_accounted(smoke_config):
    dp = _dp(smoke_config, noise=2.0, clip=0.5, not_covered=("holdout counts",))
    sent = {"w": torch.zeros(200_000)}
    m = len(smoke_config.site_names)
    states = [{"w": torch.zeros(200_000)} for _ in range(m)]
    out = dp.release(sent, states)
    assert float(out["w"].std()) == pytest.approx(2.0 * 0.5 / m, rel=0.02)  # z * C / m
    first = dp.record()["epsilon"]
    dp.release(sent, states)
    record = dp.record()
    assert record["releases"] == 2 and math.isfinite(first) and record["epsilon"] > first > 0
    assert record["not_covered"] == ["holdout counts"] and record["phase"] == "downstream"


def test_a_task_without_releases_has_no_epsilon(smoke_config):
    assert _dp(smoke_config).record()["epsilon"] is None
