"""The downstream classifier: a small MONAI 3D ``Classifier`` and how it learns and is scored.

Training is plain epochs over a site's (or the pooled) cases with augmentation, optionally
stopped early on the ``holdout`` split (balanced accuracy, ties broken by the class-balanced
loss) keeping the best checkpoint; scores come from per-class counts so sites can send them and
a server can pool them exactly. Used by the central, local and federated arms alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import Classifier
from torch import nn

from synthct.cohort import POOLED
from synthct.config import SynthctConfig
from synthct.data.dataset import CaseSet, load_cases
from synthct.reference import augment
from synthct.training import BalancedSampler

__all__ = [
    "ArmResult",
    "EarlyStopping",
    "build_classifier",
    "class_counts",
    "holdout_score",
    "join",
    "load_cohort_for",
    "predict",
    "score_from_counts",
    "train_converged",
    "train_epochs",
]

logger = logging.getLogger(__name__)


def build_classifier(config: SynthctConfig) -> nn.Module:
    """The downstream network from ``config.downstream`` (MONAI ``Classifier``)."""
    d = config.downstream
    return Classifier(
        in_shape=(1, *config.data.shape),
        classes=config.labels.num_classes,
        channels=d.channels,
        strides=d.strides,
        num_res_units=1,
        dropout=d.dropout,
    )


def train_epochs(
    model: nn.Module,
    cases: CaseSet,
    config: SynthctConfig,
    *,
    epochs: int,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
    optimizer_state: tuple[Any, int] | None = None,
) -> float:
    """``epochs`` passes over ``cases`` (augmented; class-balanced only if configured); returns
    the mean loss of the last epoch. A fresh AdamW each call (a federated round), unless
    ``optimizer_state`` = (a store with ``load_into``/``save``, the server round) carries the
    site's AdamW moments over from its previous round."""
    loop = _EpochLoop(model, cases, config, seed)
    if optimizer_state is not None:
        store, server_round = optimizer_state
        store.load_into(loop.optimizer, server_round)
    loss = float("nan")
    for epoch in range(epochs):
        loss = loop.epoch()
        if progress is not None:
            progress(epoch + 1, epochs)
    if optimizer_state is not None and epochs:
        store.save(loop.optimizer, server_round)
    model.eval()
    return loss


class _EpochLoop:
    """One optimiser and sampler over ``cases``; ``epoch()`` makes one pass. With
    ``schedule_epochs`` the learning rate follows one cycle over that many epochs
    (``downstream.lr_schedule: onecycle``)."""

    def __init__(
        self,
        model: nn.Module,
        cases: CaseSet,
        config: SynthctConfig,
        seed: int,
        schedule_epochs: int | None = None,
    ) -> None:
        d = config.downstream
        self.model, self.cases, self.batch_size = model, cases, d.batch_size
        self.generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=d.lr, weight_decay=1e-4)
        self.sampler = BalancedSampler(cases.labels, balanced=d.balanced, generator=self.generator)
        self.steps = max(len(cases) // d.batch_size, 1)
        self.device = next(model.parameters()).device
        self.scheduler = (
            torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer, max_lr=d.lr, total_steps=schedule_epochs * self.steps
            )
            if schedule_epochs
            else None
        )

    def epoch(self) -> float:
        self.model.train()
        losses = []
        for _ in range(self.steps):
            idx = self.sampler(self.batch_size)
            x = augment(self.cases.images[idx], self.generator).to(self.device)  # CPU: reproducible
            loss = F.cross_entropy(self.model(x), self.cases.labels[idx].to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            losses.append(loss.item())
        self.model.eval()
        return float(np.mean(losses))


def holdout_score(model: nn.Module, holdout: CaseSet, num_classes: int) -> tuple[float, float]:
    """``(balanced accuracy, -class-balanced loss)`` on ``holdout``: the checkpoint kept is
    the best balanced accuracy (the loss breaks the ties a small holdout makes common)."""
    probs = predict(model, holdout.images)
    labels = holdout.labels.numpy()
    return score_from_counts(*class_counts(probs, labels, num_classes))


def class_counts(
    probs: np.ndarray, labels: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class correct and total counts and summed cross-entropy (sufficient statistics:
    sites can send them and the server pools them exactly)."""
    pred = probs.argmax(1)
    correct = np.bincount(labels[pred == labels], minlength=num_classes).astype(float)
    total = np.bincount(labels, minlength=num_classes).astype(float)
    nll = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
    return correct, total, np.bincount(labels, weights=nll, minlength=num_classes)


def score_from_counts(
    correct: np.ndarray, total: np.ndarray, nll: np.ndarray
) -> tuple[float, float]:
    """``(balanced accuracy, -class-balanced loss)`` over the classes present, from pooled
    counts. The loss is the mean over classes of each class's mean cross-entropy, so it moves
    with the rare classes as balanced accuracy does, but smoothly."""
    present = total > 0
    if not present.any():
        return float("nan"), float("nan")
    recall = correct[present] / total[present]
    loss = nll[present] / total[present]
    return float(recall.mean()), -float(loss.mean())


class EarlyStopping:
    """Keep the state with the best ``(balanced accuracy, -loss)``; ``stop`` once neither the
    balanced accuracy nor the loss has improved for ``patience`` checks (``patience`` 0: never
    stop early, still keep the best). Watching the loss too keeps a model that is still
    learning on a balanced-accuracy plateau (predicting the majority class for the first
    rounds of FedAvg) from being stopped at chance. ``snapshot`` copies a state worth keeping
    (default: clones a tensor dict)."""

    def __init__(self, patience: int, snapshot: Callable[[Any], Any] | None = None) -> None:
        self.patience = patience
        self.snapshot = snapshot or (lambda s: {k: v.detach().clone() for k, v in s.items()})
        self.best: tuple[float, float] | None = None
        self.best_state: Any = None
        self.best_at = 0
        self.checks = 0
        self.since_improved = 0  # checks since the balanced accuracy or the loss last improved
        self._best_bal = -np.inf
        self._best_neg_loss = -np.inf

    def update(self, score: tuple[float, float], state: Any) -> bool:
        """Record a check; True if it is the best so far."""
        self.checks += 1
        bal, neg_loss = score
        if bal > self._best_bal or neg_loss > self._best_neg_loss:
            self.since_improved = 0
            self._best_bal = max(self._best_bal, bal)
            self._best_neg_loss = max(self._best_neg_loss, neg_loss)
        else:
            self.since_improved += 1
        if self.best is None or score > self.best:
            self.best, self.best_at = score, self.checks
            self.best_state = self.snapshot(state)
            return True
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.since_improved >= self.patience

    def summary(self) -> dict[str, Any]:
        bal, neg_loss = self.best if self.best is not None else (float("nan"), float("nan"))
        return {
            "best_at": self.best_at,
            "checks": self.checks,
            "stopped_early": self.stop,
            "checks_without_improvement": self.since_improved,
            "holdout_balanced_accuracy": bal,
            "holdout_loss": -neg_loss,
        }


def train_converged(
    model: nn.Module,
    cases: CaseSet,
    holdout: CaseSet,
    config: SynthctConfig,
    *,
    seed: int,
) -> dict[str, Any]:
    """Train for at most ``downstream.epochs`` epochs, stop when the holdout score has not
    improved for ``downstream.patience`` epochs, and leave ``model`` at its best epoch.
    Returns where it stopped and the best holdout score (the test split is never looked at)."""
    d = config.downstream
    cycle = d.epochs if d.lr_schedule == "onecycle" else None
    loop = _EpochLoop(model, cases, config, seed, schedule_epochs=cycle)
    stopper = EarlyStopping(d.patience)
    epochs_run = 0
    for _ in range(d.epochs):
        loop.epoch()
        epochs_run += 1
        if len(holdout):
            score = holdout_score(model, holdout, config.labels.num_classes)
            stopper.update(score, model.state_dict())
            if stopper.stop:
                break
    if stopper.best_state is not None:
        model.load_state_dict(stopper.best_state)
    model.eval()
    return {"epochs_run": epochs_run, **stopper.summary()}


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """N×K class probabilities, computed on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        F.softmax(model(images[i : i + batch_size].to(device)), 1).cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def load_cohort_for(
    cohort_manifest: Path, config: SynthctConfig, site: str | None
) -> CaseSet | None:
    """The cohort's cases for ``site`` (its own and ``pooled`` ones), or all with ``None``."""
    sites = None if site is None else (site, POOLED)
    cases = load_cases(cohort_manifest, config, splits=("train",), sites=sites)
    return cases if len(cases) else None


def join(a: CaseSet, b: CaseSet | None) -> CaseSet:
    """``a`` followed by ``b`` (real cases plus a site's cohort cases)."""
    if b is None:
        return a
    return CaseSet(
        torch.cat([a.images, b.images]),
        torch.cat([a.labels, b.labels]),
        a.sites + b.sites,
        a.paths + b.paths,
    )


@dataclass
class ArmResult:
    """One training arm under one seed: test probabilities and what it trained on."""

    probs: np.ndarray  # N×K on the real test cases
    labels: np.ndarray  # N true classes
    sites: list[str]  # N sites
    train_cases: dict[str, int]
    wall_s: float
    stopping: dict[str, dict[str, Any]] | None = None  # where early stopping left each model
