"""Class-matched fidelity (KID, FD) from kernel sums pooled over sites, exact for any number
of sites.

Each site sends, per (split, class) block of its real cases, the cubic-kernel sums within the
block, its first three moment tensors and the cohort-to-block sums
(:mod:`synthct.eval.site_statistics`); between-site kernel sums follow from the moments, so the
pooled KID equals the one a single site holding every case would compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synthct.eval import distribution as dist
from synthct.eval.metric_values import MetricValue, clean_number
from synthct.eval.site_statistics import Arrays, cubic_index

__all__ = ["PooledKernelSums", "pool_kernel_sums", "class_matched_fidelity"]


@dataclass
class PooledKernelSums:
    """Kernel sums over all sites' real cases by (split, class) block, and cohort-to-block."""

    n: np.ndarray  # 2K
    s1: np.ndarray  # 2K×D
    s2: np.ndarray  # 2K×D×D
    block: np.ndarray  # 2K×2K sums over distinct pairs
    cross: np.ndarray  # N×2K


def pool_kernel_sums(replies: list[Arrays], space: str) -> PooledKernelSums:
    """Within-site sums as sent; between-site sums from the moments: with u = x·y/d,
    (u + 1)^3 = 1 + 3u + 3u^2 + u^3 and sum_AB u^p = <M_p(A), M_p(B)> / d^p."""
    d = replies[0][f"{space}_s1"].shape[1]
    _, mult = cubic_index(d)
    block = np.sum([r[f"{space}_block"] for r in replies], axis=0)
    for a, ra in enumerate(replies):
        for b, rb in enumerate(replies):
            if a == b:
                continue
            n = np.outer(ra[f"{space}_n"], rb[f"{space}_n"])
            u1 = ra[f"{space}_s1"] @ rb[f"{space}_s1"].T / d
            s2a, s2b = (r[f"{space}_s2"].reshape(len(n), -1) for r in (ra, rb))
            u2 = s2a @ s2b.T / d**2
            u3 = (ra[f"{space}_s3"] * mult) @ rb[f"{space}_s3"].T / d**3
            block += n + 3 * u1 + 3 * u2 + u3
    return PooledKernelSums(
        n=np.sum([r[f"{space}_n"] for r in replies], axis=0),
        s1=np.sum([r[f"{space}_s1"] for r in replies], axis=0),
        s2=np.sum([r[f"{space}_s2"] for r in replies], axis=0),
        block=block,
        cross=np.sum([r[f"{space}_cross"] for r in replies], axis=0),
    )


def _matched(syn_counts: np.ndarray, real_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`dist.class_matched_weights` from counts: per-case weight of each class."""
    shared = (syn_counts >= 2) & (real_counts > 0)
    w_syn, w_real = np.zeros(len(syn_counts)), np.zeros(len(real_counts))
    n_in = real_counts[shared].sum()
    if n_in == 0:
        return w_syn, w_real
    w_real[shared] = 1.0 / n_in
    w_syn[shared] = real_counts[shared] / n_in / syn_counts[shared]
    return w_syn, w_real


def _block_within(block: np.ndarray, w: np.ndarray, n: np.ndarray) -> float:
    den = float((w * n).sum() ** 2 - (w * w * n).sum())
    return float(w @ block @ w) / den if den > 0 else float("nan")


def _block_moments(
    p: PooledKernelSums, rows: slice, w: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    mu = w @ p.s1[rows]
    second = np.einsum("c,cij->ij", w, p.s2[rows])
    return mu, (second - np.outer(mu, mu)) / max(1.0 - float((w * w * p.n[rows]).sum()), 1e-12)


def class_matched_fidelity(
    p: PooledKernelSums, syn: np.ndarray, labels: np.ndarray, k: int, rounds: int, seed: int
) -> MetricValue:
    """Class-matched KID (and FD in ``detail``) of the cohort ``syn`` (standardised features,
    class indices ``labels``) against the pooled ``holdout``, with its ``train``-vs-``holdout``
    baseline and a bootstrap interval over cohort volumes; ``k`` classes."""
    train, hold = slice(0, k), slice(k, 2 * k)

    def kid_fd(x: np.ndarray, lab: np.ndarray, cross: np.ndarray) -> tuple[float, float]:
        ws, wr = _matched(np.bincount(lab, minlength=k), p.n[hold])
        w = ws[lab]
        if (w > 0).sum() < 2 or p.n[hold][wr > 0].sum() < 2:
            return float("nan"), float("nan")
        kid = (
            dist.weighted_within(x[w > 0], w[w > 0] / w.sum())
            + _block_within(p.block[hold, hold], wr, p.n[hold])
            - 2 * float(w @ cross[:, hold] @ wr)
        )
        fd = dist.frechet_from_moments(
            *dist.weighted_moments(x[w > 0], w[w > 0]), *_block_moments(p, hold, wr)
        )
        return kid, fd

    value, fd = kid_fd(syn, labels, p.cross)
    wt, wr = _matched(p.n[train], p.n[hold])
    base = (
        _block_within(p.block[train, train], wt, p.n[train])
        + _block_within(p.block[hold, hold], wr, p.n[hold])
        - 2 * float(wt @ p.block[train, hold] @ wr)
    )
    base_fd = dist.frechet_from_moments(*_block_moments(p, train, wt), *_block_moments(p, hold, wr))
    ci = dist.bootstrap_ci(
        lambda i, _j: kid_fd(syn[i], labels[i], p.cross[i])[0],
        len(syn),
        1,
        rounds=rounds,
        seed=seed,
    )
    detail = {"fd": clean_number(fd), "fd_baseline": clean_number(base_fd), "federated": "exact"}
    return MetricValue(value, base, ci, detail)
