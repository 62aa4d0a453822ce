"""Flower's own FedAvg over the sites, then one explicit evaluate message per site.

The downstream classifier and the federated reference models both train this way: rounds by
``FedAvg.start`` (weighted by cases), then the final global weights go to every site once so
each site's own evaluation comes back (not just their average, which is all
``FedAvg``'s evaluate round would return).

With ``holdout_patience`` every round also asks each site to score the new global model on its
own ``holdout`` split and send per-class counts only; the server pools them into the holdout
balanced accuracy (ties: loss), keeps the best round's weights, and once ``patience`` rounds
pass without improvement the remaining rounds send nothing (Flower's FedAvg has no stopping
hook; an empty round costs nothing). The final evaluation then uses the best weights.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from synthct.classifier import EarlyStopping, score_from_counts
from synthct.config import SynthctConfig
from synthct.fed.dp import ClassifierDP
from synthct.fed.errors import FederatedError
from synthct.fed.secagg import (
    SecAggSettings,
    SecureRound,
    apply_mean_update,
    secure_round,
    settings_from_config,
)
from synthct.fed.sites import screen_updates

__all__ = ["fedavg_then_evaluate", "holdout_count_metrics", "Converged"]

logger = logging.getLogger(__name__)


def holdout_count_metrics(
    correct: np.ndarray, total: np.ndarray, nll: np.ndarray, cases: int
) -> dict[str, float]:
    """What a site sends about its holdout: per-class correct / total counts and summed loss."""
    out: dict[str, float] = {"num-examples": cases}
    for c in range(len(total)):
        out[f"correct-{c}"], out[f"total-{c}"] = float(correct[c]), float(total[c])
        out[f"nll-{c}"] = float(nll[c])
    return out


def _pooled_score(contents: list[RecordDict], num_classes: int) -> tuple[float, float]:
    sums = {key: np.zeros(num_classes) for key in ("correct", "total", "nll")}
    for content in contents:
        m = content["metrics"]
        for key, values in sums.items():
            values += [float(m[f"{key}-{c}"]) for c in range(num_classes)]
    return score_from_counts(sums["correct"], sums["total"], sums["nll"])


@dataclass
class Converged:
    """Where holdout early stopping left a federated run."""

    rounds_run: int
    best_round: int
    holdout_balanced_accuracy: float
    holdout_loss: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "epochs_run": self.rounds_run,  # rounds: named like the central arms' record
            "best_at": self.best_round,
            "holdout_balanced_accuracy": self.holdout_balanced_accuracy,
            "holdout_loss": self.holdout_loss,
        }


class _ScreenedFedAvg(FedAvg):
    """Flower's FedAvg that sets aside a NaN/Inf or outsized update (``screen_updates``)
    before averaging, as the generator's rounds do; the others are averaged as usual.

    With ``secure`` settings each training round runs Flower's SecAgg+ instead
    (``fed/secagg.py``): no plain message is sent, the sites' clipped updates are masked and
    only their case-weighted mean reaches the server."""

    def __init__(
        self,
        norm_ratio: float,
        secure: SecAggSettings | None = None,
        dp: ClassifierDP | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.norm_ratio = norm_ratio
        self.secure = secure
        self.dp = dp
        self._sent: dict[str, Any] | None = None
        self._secure_result: SecureRound | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sent = arrays.to_torch_state_dict()
        if self.secure is None:
            return super().configure_train(server_round, arrays, config, grid)
        nodes = list(grid.get_node_ids())
        self._secure_result = secure_round(
            grid, nodes, self._sent, config, server_round, self.secure
        )
        for reason in self._secure_result.failures:
            logger.warning("round %d (secure): %s", server_round, reason)
        return []  # the round already ran; Flower's loop sends nothing more

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        if self.secure is not None:
            result, self._secure_result = self._secure_result, None
            if result is None or result.mean_update is None or self._sent is None:
                return None, None
            if self.dp is not None:  # unit weights and the DP clip norm were used on the sites
                self.dp.noise_mean(result.mean_update, len(result.sites))
            new = apply_mean_update(self._sent, result.mean_update)
            return ArrayRecord(new), MetricRecord({"secure-replies": len(result.sites)})
        replies = list(replies)
        if self._sent is not None:
            fit = [r for r in replies if not r.has_error()]
            kept, rejected = screen_updates(
                fit, self._sent, self.norm_ratio, lambda r: str(r.metadata.src_node_id)
            )
            for item in rejected:
                logger.warning(
                    "round %d: update from node %s rejected: %s",
                    server_round,
                    item["node"],
                    item["reason"],
                )
            errors = [r for r in replies if r.has_error()]
            # too few fit updates: no average this round (no replies at all: nothing was sent,
            # e.g. after early stopping, which is not worth a warning every round)
            if replies and len(kept) < self.min_train_nodes:
                logger.warning(
                    "round %d: %d fit updates < %d; not aggregated",
                    server_round,
                    len(kept),
                    self.min_train_nodes,
                )
                kept = []
            if self.dp is not None:
                if not kept:
                    return None, None
                _, metrics = super().aggregate_train(server_round, kept)  # the sites' metrics
                states = [r.content["arrays"].to_torch_state_dict() for r in kept]
                return ArrayRecord(self.dp.release(self._sent, states)), metrics
            replies = kept + errors
        return super().aggregate_train(server_round, replies)


class _HoldoutStoppingFedAvg(_ScreenedFedAvg):
    """FedAvg whose evaluate round scores each global model on the sites' holdout splits and
    which stops sending work once the pooled holdout score stalls."""

    def __init__(self, num_classes: int, patience: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.stopper = EarlyStopping(patience, snapshot=lambda arrays: arrays)
        self._evaluated: ArrayRecord | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return (
            [] if self.stopper.stop else super().configure_train(server_round, arrays, config, grid)
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.stopper.stop:
            return []
        self._evaluated = arrays
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        valid, _ = self._check_and_log_replies(replies, is_train=False)
        if not valid or self._evaluated is None:
            return None
        score = _pooled_score([msg.content for msg in valid], self.num_classes)
        self.stopper.update(score, self._evaluated)
        logger.info(
            "round %d holdout balanced accuracy %.3f, loss %.3f (best round %d)",
            server_round,
            score[0],
            -score[1],
            self.stopper.best_at,
        )
        return MetricRecord({"holdout-balanced-accuracy": score[0], "holdout-loss": -score[1]})


def fedavg_then_evaluate(
    grid: Grid,
    nodes: list[int],
    config: SynthctConfig,
    *,
    initial: ArrayRecord,
    rounds: int,
    train_config: ConfigRecord,
    what: str,
    holdout_patience: int | None = None,
    phase: str | None = None,
    dp: ClassifierDP | None = None,
) -> tuple[Result, list[RecordDict], Converged | None]:
    """``rounds`` of FedAvg from ``initial``, then every node evaluates the final weights;
    returns Flower's result, each site's reply content and, with ``holdout_patience`` (0 =
    keep the best round but never stop early), where holdout early stopping left it. The
    final evaluation message carries ``eval-split = test``; the per-round ones ``holdout``.
    A site error stops with a :class:`FederatedError` naming ``what`` was being evaluated.
    Under ``federated.secagg`` the training rounds run SecAgg+ with ``phase``'s clip norm
    (``what`` when not given). With ``dp`` every aggregate is ``fed/dp.py``'s noised,
    equal-weight mean of clipped updates, composed into its accountant."""
    common = {
        "min_train_nodes": config.federated.min_sites,
        "min_available_nodes": min(len(nodes), len(config.site_names)),
    }
    evaluate_config = None
    common["norm_ratio"] = config.federated.reject_norm_ratio
    common["dp"] = dp  # updates clipped, averaged with equal weights, noised and accounted
    if config.federated.secagg.enabled:
        common["secure"] = settings_from_config(config.federated, phase or what, dp=dp is not None)
    if holdout_patience is None:
        strategy: FedAvg = _ScreenedFedAvg(fraction_evaluate=0.0, **common)
    else:
        strategy = _HoldoutStoppingFedAvg(
            config.labels.num_classes,
            holdout_patience,
            fraction_evaluate=1.0,
            min_evaluate_nodes=config.federated.min_sites,
            **common,
        )
        evaluate_config = ConfigRecord({**dict(train_config), "eval-split": "holdout"})
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=rounds,
        timeout=config.federated.round_timeout_s,
        train_config=train_config,
        evaluate_config=evaluate_config,
    )
    final, converged = result.arrays, None
    if isinstance(strategy, _HoldoutStoppingFedAvg) and strategy.stopper.best_state is not None:
        stopper = strategy.stopper
        final = stopper.best_state
        summary = stopper.summary()
        converged = Converged(
            rounds_run=stopper.checks,
            best_round=stopper.best_at,
            holdout_balanced_accuracy=summary["holdout_balanced_accuracy"],
            holdout_loss=summary["holdout_loss"],
        )
    final_config = ConfigRecord({**dict(train_config), "eval-split": "test"})
    messages = [
        Message(
            content=RecordDict({"arrays": final, "config": final_config}),
            message_type=MessageType.EVALUATE,
            dst_node_id=node,
        )
        for node in nodes
    ]
    contents = []
    for reply in grid.send_and_receive(messages, timeout=config.federated.round_timeout_s):
        if reply.has_error():
            raise FederatedError(f"{what} evaluation failed at a site: {reply.error.reason}")
        contents.append(reply.content)
    if not contents:
        raise FederatedError(f"no site returned its {what} evaluation")
    return result, contents, converged
