"""Distribution distances between feature sets: Fréchet distance, unbiased KID, and the
precision / recall / density / coverage of Naeem et al. (2020), plus bootstrap intervals.

All take N×D float arrays. Features are standardised with the *real* set's statistics first
(``standardise``) so that no single feature dominates the distances.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "standardise",
    "safe_std",
    "STD_FLOOR_OF_MEDIAN",
    "frechet_distance",
    "kid",
    "weighted_kid",
    "weighted_frechet_distance",
    "class_matched_weights",
    "weighted_within",
    "weighted_moments",
    "frechet_from_moments",
    "pairwise",
    "knn_radius",
    "prdc",
    "bootstrap_ci",
]


# A feature whose real spread is below this share of the median feature's is (nearly) dead on
# real data: a reference-encoder unit that fires for almost no holdout case. Dividing by its
# tiny std made one fresh real case 116 standard units away and its cohort's KID 67 (real
# baseline -0.1); its spread is floored instead, so it weighs like a quiet feature.
STD_FLOOR_OF_MEDIAN = 0.05


def safe_std(std: np.ndarray) -> np.ndarray:
    """Per-feature std with near-dead features floored (see ``STD_FLOOR_OF_MEDIAN``) and dead
    ones set to 1 (every value then equals the mean)."""
    alive = std[std > 1e-12]
    floor = STD_FLOOR_OF_MEDIAN * float(np.median(alive)) if alive.size else 0.0
    return np.where(std > 1e-12, np.maximum(std, floor), 1.0)


def standardise(real: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Centre and scale every array by ``real``'s per-feature mean and (floored) std."""
    mean = real.mean(0)
    std = safe_std(real.std(0))
    return [(a - mean) / std for a in (real, *others)]


def _sqrtm_trace(a: np.ndarray, b: np.ndarray) -> float:
    """tr sqrt(A^1/2 B A^1/2) for symmetric PSD A, B via symmetric eigendecompositions
    (stable where scipy's general ``sqrtm`` returns complex noise)."""
    w, v = np.linalg.eigh(a)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root @ b @ root
    inner = (inner + inner.T) / 2
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0, None)).sum())


def frechet_distance(x: np.ndarray, y: np.ndarray) -> float:
    """||mu_x - mu_y||^2 + tr(Sx + Sy - 2 (Sx^1/2 Sy Sx^1/2)^1/2)."""
    if len(x) < 2 or len(y) < 2:
        return float("nan")
    mx, my = x.mean(0), y.mean(0)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    sx, sy = np.atleast_2d(sx), np.atleast_2d(sy)
    value = float(((mx - my) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * _sqrtm_trace(sx, sy))
    return max(value, 0.0)


def kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel ``(x.y / d + 1)^3`` (Binkowski 2018).
    Zero in expectation for samples of one distribution; can be slightly negative."""
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        return float("nan")
    d = x.shape[1]

    def k(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (a @ b.T / d + 1.0) ** 3

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def class_matched_weights(
    syn_labels: np.ndarray, real_labels: np.ndarray, min_syn: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Weights (each summing to 1) that give both sets the real set's class mix over the
    classes they share (a class needs ``min_syn`` synthetic cases and one real case); other
    cases get weight 0. A balanced cohort is thus compared with real data class for class."""
    shared = [
        c
        for c in np.unique(syn_labels)
        if (syn_labels == c).sum() >= min_syn and (real_labels == c).any()
    ]
    w_syn, w_real = np.zeros(len(syn_labels)), np.zeros(len(real_labels))
    if not shared:
        return w_syn, w_real
    in_real = np.isin(real_labels, shared)
    w_real[in_real] = 1.0 / in_real.sum()
    for c in shared:
        share = (real_labels == c).sum() / in_real.sum()
        w_syn[syn_labels == c] = share / (syn_labels == c).sum()
    return w_syn, w_real


def poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's cubic polynomial kernel ``(a.b / d + 1)^3`` between the rows of ``a`` and ``b``."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def weighted_within(a: np.ndarray, w: np.ndarray) -> float:
    """Weighted mean kernel value over distinct pairs of ``a`` (the diagonal left out)."""
    ww = np.outer(w, w)
    np.fill_diagonal(ww, 0.0)
    return float((ww * poly_kernel(a, a)).sum() / ww.sum())


def weighted_kid(x: np.ndarray, wx: np.ndarray, y: np.ndarray, wy: np.ndarray) -> float:
    """KID with case weights (each summing to 1): diagonal terms left out and the within-set
    sums renormalised, so equal weights give exactly :func:`kid`."""
    keep_x, keep_y = wx > 0, wy > 0
    x, wx, y, wy = x[keep_x], wx[keep_x], y[keep_y], wy[keep_y]
    if len(x) < 2 or len(y) < 2:
        return float("nan")
    kxy = poly_kernel(x, y)
    return weighted_within(x, wx) + weighted_within(y, wy) - 2 * float(wx @ kxy @ wy)


def class_matched_kid(
    syn: np.ndarray,
    syn_labels: np.ndarray,
    real: np.ndarray,
    real_labels: np.ndarray,
    scale: np.ndarray,
) -> float:
    """KID between two feature sets with the classes matched (each class weighted alike on
    both sides), both standardised by ``scale``'s spread (a wider reference set: a site's
    few cases alone would give near-zero spreads and blow distances up)."""
    _, real_z, syn_z = standardise(scale, real, syn)
    w_syn, w_real = class_matched_weights(syn_labels, real_labels)
    return weighted_kid(syn_z, w_syn, real_z, w_real)


def weighted_moments(a: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and (unbiased, reliability-weighted) covariance; ``w`` sums to 1."""
    mu = w @ a
    c = a - mu
    return mu, np.atleast_2d((c * w[:, None]).T @ c / max(1.0 - float(w @ w), 1e-12))


def frechet_from_moments(mx: np.ndarray, sx: np.ndarray, my: np.ndarray, sy: np.ndarray) -> float:
    """Fréchet distance between two Gaussians given by mean and covariance."""
    value = float(((mx - my) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * _sqrtm_trace(sx, sy))
    return max(value, 0.0)


def weighted_frechet_distance(
    x: np.ndarray, wx: np.ndarray, y: np.ndarray, wy: np.ndarray
) -> float:
    """Fréchet distance between the weighted Gaussians of ``x`` and ``y``."""
    if (wx > 0).sum() < 2 or (wy > 0).sum() < 2:
        return float("nan")

    return frechet_from_moments(*weighted_moments(x, wx), *weighted_moments(y, wy))


def pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of ``a`` and ``b``."""
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(d2, 0, None))


def knn_radius(x: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row to its k-th nearest other row (k capped at N-1)."""
    d = pairwise(x, x)
    k = min(k, len(x) - 1)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage with k-NN balls (k = 5)."""
    if len(real) < 2 or len(fake) < 2:
        nan = float("nan")
        return {"precision": nan, "recall": nan, "density": nan, "coverage": nan}
    real_r, fake_r = knn_radius(real, k), knn_radius(fake, k)
    d = pairwise(real, fake)  # R×F
    inside_real = d <= real_r[:, None]
    k_eff = min(k, len(real) - 1)
    return {
        "precision": float(inside_real.any(0).mean()),
        "recall": float((d <= fake_r[None, :]).any(1).mean()),
        "density": float(inside_real.sum(0).mean() / k_eff),
        "coverage": float((d.min(1) <= real_r).mean()),
    }


def bootstrap_ci(
    statistic: Callable[[np.ndarray, np.ndarray], float],
    n_a: int,
    n_b: int,
    *,
    rounds: int = 200,
    seed: int = 0,
    level: float = 0.9,
) -> tuple[float, float]:
    """Percentile interval of ``statistic(idx_a, idx_b)`` over resampled index sets."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        v = statistic(rng.integers(0, n_a, n_a), rng.integers(0, n_b, n_b))
        if np.isfinite(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
