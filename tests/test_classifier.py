"""The downstream classifier: early stopping keeps the best state, pooled site counts score
like the central holdout, converged training stops on holdout."""

from __future__ import annotations

import pytest
import torch

from synthct.classifier import (
    EarlyStopping,
    build_classifier,
    class_counts,
    holdout_score,
    predict,
    score_from_counts,
    train_converged,
)

pytestmark = pytest.mark.slow


def test_early_stopping_keeps_the_best_and_stops_after_patience():
    stopper = EarlyStopping(2)
    scores = [(0.5, -1.0), (0.7, -0.9), (0.7, -0.95), (0.6, -0.92), (0.9, -0.1)]
    for i, score in enumerate(scores[:4]):
        stopper.update(score, {"w": torch.tensor([float(i)])})
    assert stopper.stop and stopper.best_at == 2  # ties on accuracy go to the lower loss
    assert stopper.best_state["w"].item() == 1.0
    never = EarlyStopping(0)
    for i, score in enumerate(scores):
        never.update(score, {"w": torch.tensor([float(i)])})
    assert not never.stop and never.best_at == 5
    # a plateau in balanced accuracy while the loss still falls is not a reason to stop
    learning = EarlyStopping(2)
    for i in range(6):
        learning.update((0.25, -1.4 + 0.05 * i), {"w": torch.tensor([float(i)])})
    assert not learning.stop and learning.best_at == 6


def test_pooled_site_counts_score_like_the_central_holdout(tiny, demo_sites):
    """The federated stopping rule (per-site counts, pooled) equals the central one."""
    from synthct.data.dataset import load_cases

    holdout = load_cases(demo_sites, tiny, splits=("holdout",))
    model = build_classifier(tiny)
    k = tiny.labels.num_classes
    central = holdout_score(model, holdout, k)
    parts = [
        class_counts(predict(model, holdout.images[i::2]), holdout.labels[i::2].numpy(), k)
        for i in range(2)
    ]
    pooled = score_from_counts(*(parts[0][i] + parts[1][i] for i in range(3)))
    assert pooled == pytest.approx(central)


def test_converged_training_stops_on_holdout(tiny, demo_sites):
    from synthct.data.dataset import load_cases

    config = tiny.model_copy(
        update={"downstream": tiny.downstream.model_copy(update={"epochs": 40, "patience": 3})}
    )
    train = load_cases(demo_sites, config, splits=("train",), sites=("site_a",))
    holdout = load_cases(demo_sites, config, splits=("holdout",), sites=("site_a",))
    with torch.random.fork_rng():  # initial weights independent of the tests run before,
        torch.manual_seed(0)  # and the global RNG left as it was for those after
        model = build_classifier(config)
        info = train_converged(model, train, holdout, config, seed=0)
    # it stopped once neither the holdout balanced accuracy nor the loss had improved for
    # `patience` epochs (the best by (accuracy, -loss) may still be one of them), or ran all
    assert info["epochs_run"] == 40 or (
        info["stopped_early"] and info["checks_without_improvement"] >= 3
    )
    assert info["best_at"] <= info["epochs_run"] == info["checks"]
    # the model is left at its best epoch: scoring it again gives the recorded best
    bal, neg_loss = holdout_score(model, holdout, config.labels.num_classes)
    assert bal == pytest.approx(info["holdout_balanced_accuracy"])
    assert -neg_loss == pytest.approx(info["holdout_loss"], rel=1e-5)


def test_one_cycle_schedule_rises_to_the_peak_and_ends_near_zero(tiny, demo_sites):
    """``lr_schedule: onecycle`` runs one cycle over ``epochs`` peaking at ``lr``; the constant
    schedule never moves the rate."""
    from synthct.classifier import _EpochLoop
    from synthct.data.dataset import load_cases

    train = load_cases(demo_sites, tiny, splits=("train",), sites=("site_a",))
    down = tiny.downstream.model_copy(update={"lr": 3e-3, "lr_schedule": "onecycle"})
    config = tiny.model_copy(update={"downstream": down})
    model = build_classifier(config)
    loop = _EpochLoop(model, train, config, seed=0, schedule_epochs=4)
    rates = []
    for _ in range(4):
        loop.epoch()
        rates.append(loop.optimizer.param_groups[0]["lr"])
    assert max(rates) <= 3e-3 * (1 + 1e-6) and rates[-1] < 3e-3 / 100
    assert rates.index(max(rates)) in (0, 1)  # warm-up takes the first ~30 % of the steps
    constant = _EpochLoop(build_classifier(tiny), train, tiny, seed=0)
    constant.epoch()
    assert constant.optimizer.param_groups[0]["lr"] == tiny.downstream.lr
