"""Does a cohort made for a site look like that site's scans? (the ``site_style`` rule)

Sites differ in scanner style (noise, kernel, HU calibration, slice thickness) and in case
mix. The style is compared on hand-crafted HU/texture features with the class effect taken
out: from every case, real or synthetic, the mean feature vector of its class over the real
reference cases is subtracted, so a cohort of mostly lesions is not judged "far" from a site
whose scans are mostly normal. For each target site, the mean of the class-adjusted features
of the cases made for it is compared with every site's real mean; the cohort's value is the
share of target sites whose nearest real site is their own. Its baseline is the same share for
the real ``train`` cases standing in for the cohort.

Everything here works on per-site sums and counts, so a federated gate can compute it from
what sites send.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MIN_CASES",
    "SiteSums",
    "site_sums",
    "class_means",
    "class_means_from_sums",
    "adjusted_sums_from_blocks",
    "style_match",
]

MIN_CASES = 3  # fewer cohort cases for a site than this: the site is not judged


@dataclass
class SiteSums:
    """Per site: the summed class-adjusted features and the case count."""

    sums: dict[str, np.ndarray]
    counts: dict[str, int]

    def means(self) -> dict[str, np.ndarray]:
        return {s: self.sums[s] / self.counts[s] for s in self.sums if self.counts[s] > 0}


def class_means(features: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """K×F mean feature vector per class (a class without cases gets the overall mean)."""
    onehot = np.eye(num_classes)[labels]
    return class_means_from_sums(onehot.T @ features, onehot.sum(0))


def class_means_from_sums(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """K×F class means from per-class feature sums (K×F) and counts (K)."""
    overall = sums.sum(0) / max(float(counts.sum()), 1.0)
    safe = np.where(counts > 0, counts, 1.0)[:, None]
    return np.where(counts[:, None] > 0, sums / safe, overall)


def adjusted_sums_from_blocks(
    sums: dict[str, np.ndarray], counts: dict[str, np.ndarray], means: np.ndarray
) -> SiteSums:
    """Class-adjusted site sums from per-site, per-class feature sums (K×F) and counts (K):
    what a federated site sends is enough (``sum_c (S_c - n_c * mean_c)``)."""
    return SiteSums(
        {s: (sums[s] - counts[s][:, None] * means).sum(0) for s in sums},
        {s: int(counts[s].sum()) for s in sums},
    )


def site_sums(
    features: np.ndarray, labels: np.ndarray, sites: Sequence[str], means: np.ndarray
) -> SiteSums:
    """Class-adjusted feature sums per site (``features - means[label]``), through the same
    per-site, per-class sums a federated site sends (:func:`adjusted_sums_from_blocks`)."""
    onehot = np.eye(len(means))[labels]
    site_arr = np.asarray(sites)
    blocks, counts = {}, {}
    for site in sorted(set(sites)):
        rows = onehot[site_arr == site]
        blocks[site] = rows.T @ features[site_arr == site]
        counts[site] = rows.sum(0)
    return adjusted_sums_from_blocks(blocks, counts, means)


def style_match(target: SiteSums, real: SiteSums) -> tuple[float, dict[str, dict]]:
    """Share of target sites (known to ``real``, with >= MIN_CASES cases) whose nearest real
    site mean is their own; per target the distances to every real site. NaN when no target
    site can be judged (a pooled cohort)."""
    real_means = real.means()
    detail: dict[str, dict] = {}
    matched = []
    for site, mean in target.means().items():
        if site not in real_means or target.counts[site] < MIN_CASES:
            continue
        dist = {s: float(np.linalg.norm(mean - m)) for s, m in real_means.items()}
        nearest = min(dist, key=dist.get)
        matched.append(nearest == site)
        detail[site] = {
            "nearest": nearest,
            "distance": {s: round(d, 4) for s, d in dist.items()},
            "cases": target.counts[site],
        }
    return (float(np.mean(matched)) if matched else float("nan")), detail
