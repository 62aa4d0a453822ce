"""The utility rule: paired holdout changes, bands, local arms, and when it cannot judge."""

from __future__ import annotations

import pytest

from synthct.eval.utility import holdout_scores, utility_verdict


def stop(ba: float, loss: float) -> dict:
    return {"all": {"holdout_balanced_accuracy": ba, "holdout_loss": loss, "best_at": 3}}


BANDS = {"loss_band": 0.03, "balanced_accuracy_band": 0.03}


def test_a_cohort_that_helps_or_stays_within_the_band_passes():
    real = [(0, stop(0.90, 0.30)), (1, stop(0.92, 0.28))]
    helps = utility_verdict(real, [(0, stop(0.95, 0.15)), (1, stop(0.94, 0.20))], **BANDS)
    assert helps["passed"] is True and helps["loss_change"] == pytest.approx(-0.115)
    slight = utility_verdict(real, [(0, stop(0.88, 0.32)), (1, stop(0.90, 0.30))], **BANDS)
    assert slight["passed"] is True  # -0.02 accuracy, +0.02 loss: seed noise


def test_harm_beyond_either_band_fails_and_says_why():
    real = [(0, stop(0.90, 0.30))]
    worse_loss = utility_verdict(real, [(0, stop(0.91, 0.40))], **BANDS)
    assert worse_loss["passed"] is False and "FAILED" in worse_loss["reason"]
    assert "+0.100" in worse_loss["reason"]
    worse_accuracy = utility_verdict(real, [(0, stop(0.80, 0.25))], **BANDS)
    assert worse_accuracy["passed"] is False
    # the mean over seeds decides: one bad seed among good ones does not fail alone
    real3 = [(s, stop(0.90, 0.30)) for s in range(3)]
    mixed = [(0, stop(0.86, 0.34)), (1, stop(0.92, 0.27)), (2, stop(0.92, 0.27))]
    assert utility_verdict(real3, mixed, **BANDS)["passed"] is True


def test_seeds_are_paired_not_pooled():
    real = [(0, stop(0.90, 0.30)), (1, stop(0.60, 0.90))]
    # seed 1's real-only run was poor; the cohort's seed 1 is equally poor: no change
    record = utility_verdict(real, [(1, stop(0.60, 0.90)), (0, stop(0.90, 0.30))], **BANDS)
    assert record["loss_change"] == 0 and record["passed"] is True


def test_local_arms_use_the_mean_over_sites_own_models():
    local = {
        "site_a": {"holdout_balanced_accuracy": 0.8, "holdout_loss": 0.4},
        "site_b": {"holdout_balanced_accuracy": 0.6, "holdout_loss": 0.8},
    }
    assert holdout_scores(local) == pytest.approx((0.7, 0.6))
    assert holdout_scores(None) is None
    nan = {"all": {"holdout_balanced_accuracy": float("nan"), "holdout_loss": float("nan")}}
    assert holdout_scores(nan) is None  # no holdout cases: nothing to judge


def test_disabled_or_not_computable_is_not_a_pass():
    real = [(0, stop(0.90, 0.30))]
    off = utility_verdict(real, [(0, stop(0.1, 2.0))], **BANDS, enabled=False)
    assert off["passed"] is None and off["reason"] == "disabled"
    unpaired = utility_verdict(real, [(1, stop(0.9, 0.3))], **BANDS)
    assert unpaired["passed"] is None and "not computable" in unpaired["reason"]
