"""Classifier metrics on the real ``test`` split, per site and overall.

Balanced accuracy and per-class recall over the classes present; macro AUC (one-vs-rest) over
the classes with both positives and negatives; the worst site's balanced accuracy and the gap
between the best and the worst site. The rare classes are listed first.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["roc_auc", "classification_metrics", "per_site_metrics"]


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
