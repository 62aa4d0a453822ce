"""What a site computes for the gate: aggregates of its own real cases, never the cases.

Round 1, :func:`site_summary`: counts, holdout feature sums and squares (the pooled
standardisation) and tissue-median ranges. Round 2, :func:`site_evidence`: the cohort
(synthetic, so it may travel) scored against the site's own ``train``/``holdout``: per (split,
class) feature sums, outer products and packed third moments (with them the cubic kernel of KID
and the Gaussian of FD are exact across sites), kernel sums between each cohort volume and each
block, k-NN ball counts, each cohort volume's best match score, histograms of real cases' match
scores, a confusion matrix, and per scanner site of its cases the radiomics sums and closeness
that ``site_style``/``site_balance`` compare. :mod:`synthct.eval.metrics` pools the replies;
the central gate is one site holding every case.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from itertools import combinations_with_replacement

import numpy as np

from synthct.eval import distribution as dist
from synthct.eval.diversity import pairwise_msssim
from synthct.eval.features import FeatureSet
from synthct.eval.metric_values import hu_insane
from synthct.eval.privacy import MatchSet, copy_scores

__all__ = [
    "SPACES",
    "K_NN",
    "SCORE_EDGES",
    "Arrays",
    "SiteData",
    "withhold_small_classes",
    "site_summary",
    "site_evidence",
    "privacy_aggregates",
    "cubic_index",
    "cubic_moment",
]

SPACES = ("encoder", "radiomics")
K_NN = 5  # as in distribution.prdc
DCR_REPEATS = 5  # train subsets as large as holdout, for DCR
SCORE_EDGES = np.linspace(-1.0, 1.0, 2001)  # match-score histograms (NCC in [-1, 1])

Arrays = dict[str, np.ndarray]


@dataclass
class SiteData:
    """One site's real cases, featurised with the reference models the server sent."""

    train: FeatureSet
    holdout: FeatureSet
    train_match: MatchSet
    holdout_match: MatchSet
    holdout_pred: np.ndarray


def small_class_flags(counts: np.ndarray, min_cases: int) -> np.ndarray:
    """K flags: the classes held at all but by fewer than ``min_cases`` cases (``counts``:
    ``train`` + ``holdout`` per class at one site), which the site sends nothing about."""
    return (counts > 0) & (counts < min_cases)


def withhold_small_classes(
    site: SiteData, num_classes: int, min_cases: int
) -> tuple[SiteData, np.ndarray]:
    """The site's data without every class it holds fewer than ``min_cases`` cases of
    (``train`` and ``holdout`` together, at least one): statistics of a class that small
    describe a handful of patients, so the site sends none for it and the gate reports the
    class as not evaluated there. Returns the data that may be used and the K withheld flags."""
    counts = np.bincount(site.train.labels, minlength=num_classes) + np.bincount(
        site.holdout.labels, minlength=num_classes
    )
    withheld = small_class_flags(counts, min_cases)
    if not withheld.any():
        return site, withheld.astype(np.int64)
    keep_train = np.flatnonzero(~withheld[site.train.labels])
    keep_holdout = np.flatnonzero(~withheld[site.holdout.labels])
    if not len(keep_train) or not len(keep_holdout):
        raise ValueError(
            f"every train or holdout case here is in a class with fewer than {min_cases} "
            "cases: nothing can be sent without describing a handful of patients"
        )
    kept = SiteData(
        train=site.train.subset(keep_train),
        holdout=site.holdout.subset(keep_holdout),
        train_match=site.train_match.subset(keep_train),
        holdout_match=site.holdout_match.subset(keep_holdout),
        holdout_pred=site.holdout_pred[keep_holdout],
    )
    return kept, withheld.astype(np.int64)


def site_summary(site: SiteData, num_classes: int) -> Arrays:
    """Counts, holdout feature sums / squares and tissue-median ranges of one site."""
    out = {
        "count_train": np.bincount(site.train.labels, minlength=num_classes),
        "count_holdout": np.bincount(site.holdout.labels, minlength=num_classes),
    }
    for space in SPACES:
        x = site.holdout.space(space)
        out[f"{space}_sum"], out[f"{space}_sumsq"] = x.sum(0), (x * x).sum(0)
    both = np.concatenate([site.train.medians, site.holdout.medians])
    for name, med in (("train", site.train.medians), ("all", both)):
        out[f"median_{name}_min"] = np.fmin.reduce(med, axis=0, initial=np.inf)
        out[f"median_{name}_max"] = np.fmax.reduce(med, axis=0, initial=-np.inf)
    out["median_present"] = (~np.isnan(both)).sum(0)
    out["median_cases"] = np.array([len(both)])
    return out


def _z(x: np.ndarray, request: Arrays, space: str) -> np.ndarray:
    """Standardised as the server's plan says (pooled holdout mean and std)."""
    return (x - request[f"{space}_mean"]) / request[f"{space}_std"]


@cache
def cubic_index(d: int) -> tuple[np.ndarray, np.ndarray]:
    """Index triples i <= j <= k of a symmetric D×D×D tensor and how often each occurs."""
    idx = np.array(list(combinations_with_replacement(range(d), 3)), dtype=np.int64)
    distinct = np.array([len(set(t)) for t in idx.tolist()])
    multiplicity = np.select([distinct == 1, distinct == 2], [1.0, 3.0], 6.0)
    return idx, multiplicity


def cubic_moment(x: np.ndarray) -> np.ndarray:
    """Packed sum over rows of x ⊗ x ⊗ x (unique entries only)."""
    idx, _ = cubic_index(x.shape[1])
    out = np.zeros(len(idx))
    for row in x:
        out += row[idx[:, 0]] * row[idx[:, 1]] * row[idx[:, 2]]
    return out


def _block_onehot(sets: list[FeatureSet], k: int) -> np.ndarray:
    """N×(2K) one-hot of (split, class) for the site's train then holdout cases."""
    blocks = np.concatenate([s.labels + i * k for i, s in enumerate(sets)])
    return np.eye(2 * k)[blocks] if len(blocks) else np.zeros((0, 2 * k))


def _kernel_aggregates(site: SiteData, request: Arrays, space: str, k: int) -> Arrays:
    """Per (split, class) block: counts, first/second/packed third moments, exact kernel sums
    within the site and between each cohort volume and each block."""
    sets = [site.train, site.holdout]
    real = np.concatenate([_z(s.space(space), request, space) for s in sets])
    syn = _z(request[f"cohort_{space}"], request, space)
    onehot = _block_onehot(sets, k)
    gram = dist.poly_kernel(real, real) if len(real) else np.zeros((0, 0))
    np.fill_diagonal(gram, 0.0)
    moments3 = [cubic_moment(real[onehot[:, b] > 0]) for b in range(2 * k)]
    return {
        f"{space}_n": onehot.sum(0),
        f"{space}_s1": onehot.T @ real,
        f"{space}_s2": np.einsum("nb,ni,nj->bij", onehot, real, real),
        f"{space}_s3": np.stack(moments3),
        f"{space}_block": onehot.T @ gram @ onehot,
        f"{space}_cross": dist.poly_kernel(syn, real) @ onehot
        if len(real)
        else np.zeros((len(syn), 2 * k)),
    }


def _radii(x: np.ndarray, n_total: int, fallback: np.ndarray | None = None) -> np.ndarray:
    """k-NN ball radii among the site's own cases of a class (k = 5 capped as the pooled
    metric caps it). Phantom sites differ in scanner style, so a case's pooled neighbours
    are mostly its own site's: the within-site radius with the same k is the closer match
    (measured: a k scaled down by the site's share halved coverage on fresh real cases).
    A lone case has no within-site neighbour; its radius then comes from the site's other
    real cases of the class in ``fallback`` (its train split), else it is 0."""
    k = min(K_NN, n_total - 1)
    if len(x) >= 2:
        return dist.knn_radius(x, k)
    if len(x) == 1 and fallback is not None and len(fallback):
        d = np.sort(dist.pairwise(x, fallback)[0])
        return d[min(k, len(d)) - 1 : min(k, len(d))]
    return np.zeros(len(x))


def _prdc_aggregates(site: SiteData, request: Arrays, k: int) -> Arrays:
    """k-NN ball counts in the encoder space, for the cohort and (baseline) the site's train."""
    syn = _z(request["cohort_encoder"], request, "encoder")
    syn_labels, syn_radii = request["cohort_labels"], request["cohort_radii"]
    hold = _z(site.holdout.encoder, request, "encoder")
    train = _z(site.train.encoder, request, "encoder")
    out = {
        "ball_count": np.zeros(len(syn)),
        **{f"{name}": np.zeros(k) for name in ("coverage", "recall")},
        **{f"base_{name}": np.zeros(k) for name in ("precision", "density", "coverage", "recall")},
    }
    for c in range(k):
        real_c = hold[site.holdout.labels == c]
        if not len(real_c):
            continue
        train_c = train[site.train.labels == c]
        r = _radii(real_c, int(request["count_holdout"][c]), fallback=train_c)
        idx = np.flatnonzero(syn_labels == c)
        if len(idx):
            d = dist.pairwise(real_c, syn[idx])
            inside = d <= r[:, None]
            out["ball_count"][idx] = inside.sum(0)
            out["coverage"][c] = (d.min(1) <= r).sum()
            out["recall"][c] = (d <= syn_radii[idx][None, :]).any(1).sum()
        if len(train_c):
            d = dist.pairwise(real_c, train_c)
            inside = d <= r[:, None]
            out["base_precision"][c] = inside.any(0).sum()
            out["base_density"][c] = inside.sum()
            out["base_coverage"][c] = (d.min(1) <= r).sum()
            rt = _radii(train_c, int(request["count_train"][c]), fallback=real_c)
            out["base_recall"][c] = (d <= rt[None, :]).any(1).sum()
    return out


def _histogram(scores: np.ndarray) -> np.ndarray:
    return np.histogram(np.clip(scores, -1.0, 1.0), bins=SCORE_EDGES)[0]


def privacy_aggregates(
    train: MatchSet,
    holdout: MatchSet,
    cohort: MatchSet,
    *,
    seed: int,
    index: int,
    name_matches: bool = False,
) -> Arrays:
    """One site's privacy evidence: each cohort volume's best match among its ``train`` and
    ``holdout`` cases (and, when ``name_matches``, which train case: only the central gate
    asks, a federated site never says), the same against ``train`` subsets as large as
    ``holdout`` (DCR: both sides then have the same chance of holding a near neighbour), the
    real cases' binned best scores against the cohort (membership), and the closest
    holdout-to-train pair (the near-copy threshold)."""
    to_train = copy_scores(cohort, train)
    rng = np.random.default_rng([seed, index])
    size = min(len(holdout), len(train))
    subsets = [rng.choice(len(train), size=size, replace=False) for _ in range(DCR_REPEATS)]
    holdout_to_train = copy_scores(holdout, train).score
    out = {
        "to_train": to_train.score,
        "to_holdout": copy_scores(cohort, holdout).score,
        "to_train_subsets": np.stack([copy_scores(cohort, train.subset(s)).score for s in subsets]),
        "holdout_to_train_max": np.array(
            [holdout_to_train.max() if len(holdout_to_train) else -1.0]
        ),
        "holdout_to_train_hist": _histogram(holdout_to_train),
        "member_hist": _histogram(copy_scores(train, cohort).score),
        "nonmember_hist": _histogram(copy_scores(holdout, cohort).score),
    }
    if name_matches:
        out["to_train_index"] = np.asarray(to_train.index)
    return out


def _scanner_site_aggregates(site: SiteData, request: Arrays, k: int) -> Arrays:
    """Per scanner site of the cases here (a federated site holds its own; the central gate's
    one site holds them all), keyed ``site:<name>:...``: the per-(split, class) radiomics sums
    and counts ``site_style`` compares, and the median distance from its holdout cases (of the
    classes the cohort holds) to the nearest cohort case and to the nearest train case here
    (``site_balance``)."""
    rad = _z(request["cohort_radiomics"], request, "radiomics")
    hold = _z(site.holdout.radiomics, request, "radiomics")
    train = _z(site.train.radiomics, request, "radiomics")
    held = np.isin(site.holdout.labels, np.unique(request["cohort_labels"]))
    hold_sites = np.asarray(site.holdout.sites)
    case_sites = np.concatenate([np.asarray(site.train.sites), hold_sites])
    onehot = _block_onehot([site.train, site.holdout], k)
    rows = np.concatenate([train, hold])
    out: Arrays = {}
    for name in sorted(set(case_sites.tolist())):
        here = case_sites == name
        out[f"site:{name}:radiomics_n"] = onehot[here].sum(0)
        out[f"site:{name}:radiomics_s1"] = onehot[here].T @ rows[here]
        mine = held & (hold_sites == name)
        out[f"site:{name}:closeness"] = np.array(
            [
                np.median(dist.pairwise(hold[mine], rad).min(1)) if mine.any() else np.nan,
                np.median(dist.pairwise(hold[mine], train).min(1))
                if mine.any() and len(train)
                else np.nan,
            ]
        )
    return out


def site_evidence(
    site: SiteData,
    request: Arrays,
    cohort_match: MatchSet,
    index: int,
    *,
    name_matches: bool = False,
) -> Arrays:
    """Round 2 at one site: aggregates of its real cases against the cohort (see module doc)."""
    k = len(request["count_train"])
    out: Arrays = {}
    for space in SPACES:
        out.update(_kernel_aggregates(site, request, space, k))
    out.update(_prdc_aggregates(site, request, k))
    out.update(
        privacy_aggregates(
            site.train_match,
            site.holdout_match,
            cohort_match,
            seed=int(request["seed"][0]),
            index=index,
            name_matches=name_matches,
        )
    )
    # HU sanity baseline: this site's holdout against the pooled train ranges
    required = request["required"].astype(bool)
    out["hu_base_insane"] = np.array(
        [hu_insane(site.holdout.medians, request["ranges_train"], required).sum()]
    )
    # real within-class MS-SSIM among this site's cases (split chosen by the server)
    msssim, pairs = np.zeros(k), np.zeros(k)
    for c in range(k):
        ref = site.holdout if request["msssim_split"][c] else site.train
        real_c = ref.images[ref.labels == c]
        if len(real_c) >= 2:
            pairs[c] = min(60, len(real_c) * (len(real_c) - 1) // 2)
            msssim[c] = pairwise_msssim(real_c, seed=int(request["seed"][0])) * pairs[c]
    out["msssim_sum"], out["msssim_pairs"] = msssim, pairs
    confusion = np.zeros((k, k))
    np.add.at(confusion, (site.holdout.labels, site.holdout_pred), 1)
    out["confusion"] = confusion
    out.update(_scanner_site_aggregates(site, request, k))
    return out
