"""The utility rule: a gated cohort is used only if adding it does not make the classifier
worse on the real ``holdout`` split than real data alone, beyond the noise band.

The gate judges a cohort by how it looks; this rule judges it by what it does. Both downstream
arms (real-only and real + cohort) already stop early on ``holdout`` and keep their best
checkpoint, so each arm's best holdout balanced accuracy and class-balanced loss come for free.
Per seed the arms are paired; the rule fails when the mean change over seeds is a loss increase
above ``loss_band`` or a balanced-accuracy drop below ``-balanced_accuracy_band``. ``test`` is
never read: the rule decides whether the cohort is used, and that is a choice. Privacy rules are
not traded against it: a cohort reaches this rule only after the gate passed it.

The holdout is small (the benchmark's holds four rare cases) and the best checkpoint is chosen
on it, so the rule catches gross harm, not slight harm; the bands and what they catch are in
docs/benchmarks.md ("The utility rule").
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["holdout_scores", "utility_verdict"]


def holdout_scores(stopping: dict[str, dict[str, Any]] | None) -> tuple[float, float] | None:
    """``(balanced accuracy, class-balanced loss)`` at the best checkpoint of one run: the
    pooled model's (``all``), or the mean over sites' own models (local arms); None if the run
    recorded no holdout scores (no holdout cases)."""
    if not stopping:
        return None
    entries = [stopping["all"]] if "all" in stopping else list(stopping.values())
    scores = [
        (e["holdout_balanced_accuracy"], e["holdout_loss"])
        for e in entries
        if np.isfinite(e.get("holdout_balanced_accuracy", np.nan))
        and np.isfinite(e.get("holdout_loss", np.nan))
    ]
    if not scores:
        return None
    ba, loss = np.mean(scores, axis=0)
    return float(ba), float(loss)


def utility_verdict(
    real_only: list[tuple[int, dict[str, Any] | None]],
    with_cohort: list[tuple[int, dict[str, Any] | None]],
    *,
    loss_band: float,
    balanced_accuracy_band: float,
    enabled: bool = True,
) -> dict[str, Any]:
    """The rule's record: per seed the paired holdout change, the mean over seeds, the limits
    and ``passed`` (True, False, or None when disabled or not computable)."""
    before = {seed: holdout_scores(stop) for seed, stop in real_only}
    pairs = []
    for seed, stop in with_cohort:
        a, b = before.get(seed), holdout_scores(stop)
        if a is None or b is None:
            continue
        pairs.append(
            {
                "seed": seed,
                "balanced_accuracy_change": round(b[0] - a[0], 6),
                "loss_change": round(b[1] - a[1], 6),
            }
        )
    record: dict[str, Any] = {
        "rule": "utility",
        "split": "holdout",
        "loss_band": loss_band,
        "balanced_accuracy_band": balanced_accuracy_band,
        "per_seed": pairs,
    }
    if not enabled:
        return {**record, "passed": None, "reason": "disabled"}
    if not pairs:
        return {
            **record,
            "passed": None,
            "reason": "not computable: no holdout scores for both arms of any seed",
        }
    ba = float(np.mean([p["balanced_accuracy_change"] for p in pairs]))
    loss = float(np.mean([p["loss_change"] for p in pairs]))
    passed = loss <= loss_band and ba >= -balanced_accuracy_band
    verdict = "ok" if passed else "FAILED"
    reason = (
        f"{verdict}: adding the cohort changed the holdout class-balanced loss by {loss:+.3f} "
        f"(needs <= {loss_band:+.3f}) and balanced accuracy by {ba:+.3f} "
        f"(needs >= {-balanced_accuracy_band:+.3f}), mean of {len(pairs)} seed(s): real + "
        "cohort must not do worse than real data alone beyond seed noise"
    )
    return {
        **record,
        "balanced_accuracy_change": round(ba, 6),
        "loss_change": round(loss, 6),
        "passed": passed,
        "reason": reason,
    }
