"""Classifier metrics on the real ``test`` split, per site and overall.

Balanced accuracy and per-class recall over the classes present; macro AUC (one-vs-rest) over
the classes with both positives and negatives; the worst site's balanced accuracy and the gap
between the best and the worst site. The rare classes are listed first. ``results.json`` also
carries the utility rule's verdict (``synthct.eval.utility``), judged on holdout.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from synthct.config import SynthctConfig
from synthct.eval.utility import utility_verdict

DOWNSTREAM_FORMAT = 1  # results.json of the downstream arms (central, local, federated)

__all__ = [
    "DOWNSTREAM_FORMAT",
    "roc_auc",
    "classification_metrics",
    "per_site_metrics",
    "paired_effect",
    "summarise_runs",
    "mean_sd",
    "compare_arms",
    "downstream_payload",
]


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie) (the Mann-Whitney AUC)."""
    pos, neg = np.asarray(pos, dtype=float), np.asarray(neg, dtype=float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def classification_metrics(
    probs: np.ndarray, labels: np.ndarray, classes: list[str], rare: list[str]
) -> dict[str, Any]:
    """Metrics of N×K class probabilities against N true class indices."""
    pred = probs.argmax(1)
    order = [c for c in rare if c in classes] + [c for c in classes if c not in rare]
    recall, aucs = {}, {}
    for name in order:
        c = classes.index(name)
        mask = labels == c
        if mask.any():
            recall[name] = float((pred[mask] == c).mean())
            if (~mask).any():
                aucs[name] = roc_auc(probs[mask, c], probs[~mask, c])
    return {
        "cases": int(len(labels)),
        "accuracy": float((pred == labels).mean()) if len(labels) else float("nan"),
        "balanced_accuracy": float(np.mean(list(recall.values()))) if recall else float("nan"),
        "macro_auc": float(np.mean(list(aucs.values()))) if aucs else float("nan"),
        "per_class_recall": recall,
        "per_class_auc": aucs,
    }


def per_site_metrics(
    probs: np.ndarray,
    labels: np.ndarray,
    sites: list[str],
    classes: list[str],
    rare: list[str],
) -> dict[str, Any]:
    """Overall metrics, each site's, the worst site's balanced accuracy and the best-worst gap."""
    site_arr = np.asarray(sites)
    per_site = {
        s: classification_metrics(probs[site_arr == s], labels[site_arr == s], classes, rare)
        for s in sorted(set(sites))
    }
    bal = {s: m["balanced_accuracy"] for s, m in per_site.items()}
    worst = min(bal, key=bal.get) if bal else None
    return {
        "overall": classification_metrics(probs, labels, classes, rare),
        "per_site": per_site,
        "worst_site": worst,
        "worst_site_balanced_accuracy": bal[worst] if worst else float("nan"),
        "best_worst_gap": (max(bal.values()) - min(bal.values())) if bal else float("nan"),
    }


def _recalls(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class recall (NaN for a class without cases)."""
    hits = np.bincount(labels[pred == labels], minlength=num_classes).astype(float)
    total = np.bincount(labels, minlength=num_classes).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / total


def _effect_metrics(
    pred: np.ndarray,
    labels: np.ndarray,
    site_idx: np.ndarray,
    sites: list[str],
    k: int,
    rare: list[int],
) -> np.ndarray:
    """[balanced accuracy, each rare recall, worst-site balanced accuracy, each site's]."""
    overall = _recalls(pred, labels, k)
    per_site = [
        np.nanmean(_recalls(pred[site_idx == i], labels[site_idx == i], k))
        for i in range(len(sites))
    ]
    return np.array([np.nanmean(overall), *overall[rare], np.nanmin(per_site), *per_site])


def paired_effect(
    before: list[np.ndarray],
    after: list[np.ndarray],
    labels: np.ndarray,
    sites: list[str],
    classes: list[str],
    rare: list[str],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """What changed from ``before`` to ``after`` (N×K test probabilities, one pair per training
    seed, same test cases): the mean over seeds of the paired difference in balanced accuracy,
    rare-class recall, worst-site and per-site balanced accuracy, each with a 95 % interval
    from a bootstrap over test cases (resampled within each site, the same resample for both
    arms and every seed, so the interval is of the difference, not of two separate scores)."""
    if len(before) != len(after) or not before:
        raise ValueError("paired_effect needs one 'after' run per 'before' run (same seeds)")
    names = sorted(set(sites))
    site_idx = np.array([names.index(s) for s in sites])
    k = len(classes)
    rare_idx = [classes.index(r) for r in rare if r in classes]
    keys = [
        "balanced_accuracy",
        *(f"recall_{r}" for r in rare if r in classes),
        "worst_site_balanced_accuracy",
        *(f"site_{s}_balanced_accuracy" for s in names),
    ]
    preds = [(b.argmax(1), a.argmax(1)) for b, a in zip(before, after, strict=True)]

    def delta(idx: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():  # a resample may hold no case of a class at a site
            warnings.simplefilter("ignore", RuntimeWarning)
            return _delta(idx)

    def _delta(idx: np.ndarray) -> np.ndarray:
        diffs = [
            _effect_metrics(pa[idx], labels[idx], site_idx[idx], names, k, rare_idx)
            - _effect_metrics(pb[idx], labels[idx], site_idx[idx], names, k, rare_idx)
            for pb, pa in preds
        ]
        return np.nanmean(diffs, axis=0)

    point = delta(np.arange(len(labels)))
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(site_idx == i) for i in range(len(names))]
    draws = np.array(
        [
            delta(np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups]))
            for _ in range(bootstrap)
        ]
    )
    with np.errstate(invalid="ignore"):
        low, high = np.nanpercentile(draws, [2.5, 97.5], axis=0)
    return {
        "seeds": len(before),
        "bootstrap": bootstrap,
        **{
            key: {"mean": float(p), "ci95": [float(lo), float(hi)]}
            for key, p, lo, hi in zip(keys, point, low, high, strict=True)
        },
    }


def mean_sd(values: list[float]) -> dict[str, float]:
    """Mean and sample SD over seeds of the finite values (None and NaN left out)."""
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    if not len(arr):
        return {"mean": float("nan"), "sd": float("nan")}
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}


def summarise_runs(runs: list[dict[str, Any]], rare: list[str]) -> dict[str, Any]:
    """Mean ± sd over seeds of the headline numbers."""
    out = {
        "balanced_accuracy": mean_sd([r["overall"]["balanced_accuracy"] for r in runs]),
        "macro_auc": mean_sd([r["overall"]["macro_auc"] for r in runs]),
        "worst_site_balanced_accuracy": mean_sd([r["worst_site_balanced_accuracy"] for r in runs]),
        "best_worst_gap": mean_sd([r["best_worst_gap"] for r in runs]),
    }
    for name in rare:
        out[f"recall_{name}"] = mean_sd([r["overall"]["per_class_recall"].get(name) for r in runs])
    sites = sorted(runs[0]["per_site"]) if runs else []
    out["per_site_balanced_accuracy"] = {
        s: mean_sd([r["per_site"][s]["balanced_accuracy"] for r in runs]) for s in sites
    }
    return out


def _by_site(result) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """An arm's test probabilities, labels and sites ordered by site (stable within a site:
    every site returns its own test cases in file order, whichever arm or transport)."""
    order = np.argsort(np.asarray(result.sites), kind="stable")
    return result.probs[order], np.asarray(result.labels)[order], [result.sites[i] for i in order]


def compare_arms(
    arms: dict[str, list[tuple[int, Any]]], classes: list[str], rare: list[str]
) -> dict[str, Any]:
    """Each arm's runs (seed, ``ArmResult``) scored per site, summarised over seeds and, with
    two arms, the paired effect of the second over the first. Every run must hold the same
    test cases (the same labels per site); a mismatch is an error, not a silent misalignment."""
    out: dict[str, Any] = {}
    aligned: dict[str, list[np.ndarray]] = {}
    reference: tuple[np.ndarray, list[str]] | None = None
    for arm, results in arms.items():
        runs = []
        for seed, result in results:
            metrics = per_site_metrics(result.probs, result.labels, result.sites, classes, rare)
            runs.append(
                {
                    "seed": seed,
                    "train_cases": result.train_cases,
                    "wall_s": round(result.wall_s, 1),
                    "stopping": result.stopping,
                    **metrics,
                }
            )
            probs, labels, sites = _by_site(result)
            if reference is None:
                reference = (labels, sites)
            elif sites != reference[1] or not np.array_equal(labels, reference[0]):
                raise ValueError(f"arm {arm!r}, seed {seed}: evaluated on other test cases")
            aligned.setdefault(arm, []).append(probs)
        out[arm] = {"runs": runs, "summary": summarise_runs(runs, rare)}
    payload: dict[str, Any] = {"arms": out}
    if len(arms) == 2 and reference is not None:
        before, after = aligned.values()
        payload["effect"] = paired_effect(before, after, *reference, classes, rare)
    return payload


def downstream_payload(
    arms: dict[str, list[tuple[int, Any]]],
    *,
    config: SynthctConfig,
    mode: str,
    cohort: str | None,
    gate: dict[str, Any] | None,
    test_cases: int,
    **extra: Any,
) -> dict[str, Any]:
    """The downstream ``results.json``: what ran (mode, cohort and its gate, the config's
    seeds), each arm per seed and (two arms) the paired effect of the synthetic data with 95 %
    intervals and the utility rule's verdict on holdout (the config's bands)."""
    classes, rare = list(config.labels.classes), list(config.labels.rare)
    utility_rule = config.downstream.utility
    if "real+synthetic" in arms:
        extra["utility"] = utility_verdict(
            [(seed, r.stopping) for seed, r in arms["real"]],
            [(seed, r.stopping) for seed, r in arms["real+synthetic"]],
            loss_band=utility_rule.loss_band,
            balanced_accuracy_band=utility_rule.balanced_accuracy_band,
            enabled=utility_rule.enabled,
        )
    return {
        "mode": mode,
        **extra,
        "cohort": cohort,
        "gate": gate,
        "ungated": bool(gate and not gate["gated"]),
        "classes": classes,
        "rare": rare,
        "seeds": list(config.downstream.seeds),
        "test_cases": test_cases,
        **compare_arms(arms, classes, rare),
        "format": DOWNSTREAM_FORMAT,
    }
