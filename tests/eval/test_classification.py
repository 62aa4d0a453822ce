"""Per-site classifier metrics against a prediction table computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from synthct.eval.classification import classification_metrics, per_site_metrics, roc_auc

CLASSES = ["normal", "nodule", "consolidation"]


def test_auc_counts_ties_half():
    assert roc_auc(np.array([0.9, 0.5]), np.array([0.5, 0.1])) == pytest.approx(0.875)


def test_per_site_metrics_match_the_hand_computed_table():
    # site x: truths 0,0,1,2 predicted 0,1,1,2 -> recalls normal 1/2, nodule 1, consolidation 1
    # site y: truths 0,1,1   predicted 0,0,1   -> recalls normal 1, nodule 1/2
    probs = np.array(
        [
            [0.8, 0.1, 0.1],
            [0.3, 0.6, 0.1],
            [0.2, 0.7, 0.1],
            [0.1, 0.2, 0.7],
            [0.6, 0.3, 0.1],
            [0.5, 0.4, 0.1],
            [0.2, 0.7, 0.1],
        ]
    )
    labels = np.array([0, 0, 1, 2, 0, 1, 1])
    sites = ["x", "x", "x", "x", "y", "y", "y"]
    m = per_site_metrics(probs, labels, sites, CLASSES, rare=["consolidation"])
    x, y = m["per_site"]["x"], m["per_site"]["y"]
    assert list(x["per_class_recall"]) == ["consolidation", "normal", "nodule"]  # rare first
    assert x["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert y["balanced_accuracy"] == pytest.approx((1 + 0.5) / 2)
    assert "consolidation" not in y["per_class_recall"]
    assert m["worst_site"] == "y" and m["worst_site_balanced_accuracy"] == pytest.approx(0.75)
    assert m["best_worst_gap"] == pytest.approx(5 / 6 - 0.75)
    overall = m["overall"]
    assert overall["accuracy"] == pytest.approx(5 / 7)
    assert overall["per_class_recall"] == pytest.approx(
        {"consolidation": 1.0, "normal": 2 / 3, "nodule": 2 / 3}
    )
    # nodule AUC: positives (0.7, 0.4, 0.7) vs negatives (0.1, 0.6, 0.2, 0.3): 4+3+4 of 12
    assert overall["per_class_auc"]["nodule"] == pytest.approx(11 / 12)


def test_empty_and_single_class_sets_do_not_crash():
    m = classification_metrics(np.zeros((2, 3)) + 1 / 3, np.array([1, 1]), CLASSES, [])
    assert m["per_class_auc"] == {} and np.isnan(m["macro_auc"])


def test_paired_effect_is_the_difference_with_an_interval_around_it():
    from synthct.eval.classification import paired_effect

    rng = np.random.default_rng(0)
    classes, rare = ["normal", "nodule", "consolidation"], ["consolidation"]
    labels = np.repeat([0, 1, 2], 40)
    sites = ["a", "b"] * 60
    onehot = np.eye(3)
    right = onehot[labels]
    before = right.copy()
    before[labels == 2] = onehot[0]  # the rare class is never found before ...
    after = right.copy()  # ... and always after
    same = paired_effect([before, before], [before, before], labels, sites, classes, rare)
    assert same["balanced_accuracy"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    gain = paired_effect([before], [after], labels, sites, classes, rare, bootstrap=200)
    assert gain["recall_consolidation"]["mean"] == 1.0
    assert abs(gain["balanced_accuracy"]["mean"] - 1 / 3) < 1e-9
    assert gain["site_a_balanced_accuracy"]["mean"] > 0 and gain["seeds"] == 1
    # a noisy gain: the interval contains the point estimate and is not degenerate
    noisy = right.copy()
    flip = rng.random(len(labels)) < 0.3
    noisy[flip] = onehot[(labels[flip] + 1) % 3]
    effect = paired_effect([noisy], [after], labels, sites, classes, rare, bootstrap=200)
    low, high = effect["balanced_accuracy"]["ci95"]
    assert low < effect["balanced_accuracy"]["mean"] < high and low > 0
