"""The gate's metrics from per-site aggregates: no site's real cases (or their features) leave it.

Two rounds. :func:`site_summary` — counts, feature sums and squares (the pooled holdout
standardisation) and tissue-median ranges. :func:`site_evidence` — the cohort (synthetic, so it
may travel) scored against the site's own ``train``/``holdout`` and returned as aggregates only:
per (split, class) feature sums, outer products and packed third moments (with them the cubic
kernel of KID and the Gaussian of FD are exact across sites), kernel sums between each cohort
volume and each block, each cohort volume's best match score, k-NN ball counts, histograms of
real cases' match scores and a confusion matrix. :func:`combine_evidence` turns the replies
into the metrics :func:`synthct.eval.cohort_metrics.cohort_metrics` computes centrally.

Exact (equal to central mode): both KIDs and FDs with their baselines and intervals, HU sanity,
each volume's near-copy score, conditioning, proportions, per-site fidelity. Distances between
two sites' real cases are never computed, so these use neighbours within a site (their detail
says ``site-local``): PRDC ball radii (k scaled by the site's share of the class), the
near-copy threshold, real MS-SSIM, DCR (train subsampled per site), membership AUC (all of
train, binned scores) and the per-site fidelity baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from itertools import combinations_with_replacement

import numpy as np

from synthct.eval import distribution as dist
from synthct.eval.cohort_metrics import (
    MIN_PER_CLASS,
    MetricValue,
    clean_number,
    closeness_ratio,
    hu_insane,
    hu_ranges_from,
    near_copy_threshold,
    wilson_interval,
)
from synthct.eval.diversity import pairwise_msssim
from synthct.eval.features import FeatureSet
from synthct.eval.privacy import MatchSet, copy_scores
from synthct.eval.site_style import (
    adjusted_sums_from_blocks,
    class_means_from_sums,
    site_sums,
    style_match,
)

__all__ = [
    "SPACES",
    "SiteData",
    "CohortSide",
    "Plan",
    "withhold_small_classes",
    "site_summary",
    "combine_summary",
    "cohort_request",
    "site_evidence",
    "combine_evidence",
]

SPACES = ("encoder", "radiomics")
SPLITS = ("train", "holdout")
K_NN = 5  # as in distribution.prdc
DCR_REPEATS = 5  # as in privacy.dcr_share
SCORE_EDGES = np.linspace(-1.0, 1.0, 2001)  # match-score histograms (NCC in [-1, 1])
SITE_LOCAL = "site-local: within-site neighbours only"

Arrays = dict[str, np.ndarray]


@dataclass
class SiteData:
    """One site's real cases, featurised with the reference models the server sent."""

    train: FeatureSet
    holdout: FeatureSet
    train_match: MatchSet
    holdout_match: MatchSet
    holdout_pred: np.ndarray


@dataclass
class CohortSide:
    """The cohort on the server: features, matching set and the reference's predictions."""

    features: FeatureSet
    match: MatchSet
    pred: np.ndarray


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
    withheld = (counts > 0) & (counts < min_cases)
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


# --- round 1 -------------------------------------------------------------------------------


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


@dataclass
class Plan:
    """What the server learnt in round 1: pooled counts, standardisation and HU ranges."""

    count_train: np.ndarray
    count_holdout: np.ndarray
    mean: dict[str, np.ndarray]
    std: dict[str, np.ndarray]
    ranges_all: np.ndarray
    ranges_train: np.ndarray
    required: np.ndarray


def combine_summary(replies: list[Arrays]) -> Plan:
    """Pool the sites' round-1 summaries (exactly what the central gate computes)."""

    def total(key: str) -> np.ndarray:
        return np.sum([r[key] for r in replies], axis=0)

    n = float(total("count_holdout").sum())
    mean, std = {}, {}
    for space in SPACES:
        m = total(f"{space}_sum") / n
        var = np.clip(total(f"{space}_sumsq") / n - m * m, 0, None)
        s = np.sqrt(var)
        mean[space], std[space] = m, dist.safe_std(s)

    def ranges(name: str) -> np.ndarray:
        lo = np.min([r[f"median_{name}_min"] for r in replies], axis=0)
        hi = np.max([r[f"median_{name}_max"] for r in replies], axis=0)
        return hu_ranges_from(
            np.where(np.isfinite(lo), lo, np.nan), np.where(np.isfinite(hi), hi, np.nan)
        )

    return Plan(
        count_train=total("count_train"),
        count_holdout=total("count_holdout"),
        mean=mean,
        std=std,
        ranges_all=ranges("all"),
        ranges_train=ranges("train"),
        required=total("median_present") / max(float(total("median_cases")[0]), 1.0) >= 0.9,
    )


# --- round 2 -------------------------------------------------------------------------------


def cohort_request(plan: Plan, cohort: CohortSide, seed: int) -> Arrays:
    """Everything a site needs to score the cohort: the plan, the cohort's features and
    labels, its own k-NN radii (for recall) and which split each class's real MS-SSIM uses."""
    labels = cohort.features.labels
    k = len(plan.count_train)
    syn_z = _z(cohort.features.encoder, plan, "encoder")
    radii = np.zeros(len(labels))
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        if len(idx) >= 2:
            radii[idx] = dist.knn_radius(syn_z[idx], K_NN)
    msssim_split = np.where(plan.count_holdout >= MIN_PER_CLASS, 1, 0)  # 1 holdout, 0 train
    request: Arrays = {
        "cohort_labels": labels,
        "cohort_radii": radii,
        "msssim_split": msssim_split,
        "ranges_train": plan.ranges_train,
        "required": plan.required.astype(np.int64),
        "count_train": plan.count_train,
        "count_holdout": plan.count_holdout,
        "seed": np.array([seed]),
    }
    for space in SPACES:
        request[f"cohort_{space}"] = cohort.features.space(space)
        request[f"{space}_mean"], request[f"{space}_std"] = plan.mean[space], plan.std[space]
    return request


def _z(x: np.ndarray, plan_or_request, space: str) -> np.ndarray:
    if isinstance(plan_or_request, Plan):
        return (x - plan_or_request.mean[space]) / plan_or_request.std[space]
    return (x - plan_or_request[f"{space}_mean"]) / plan_or_request[f"{space}_std"]


@cache
def _cubic_index(d: int) -> tuple[np.ndarray, np.ndarray]:
    """Index triples i <= j <= k of a symmetric D×D×D tensor and how often each occurs."""
    idx = np.array(list(combinations_with_replacement(range(d), 3)), dtype=np.int64)
    distinct = np.array([len(set(t)) for t in idx.tolist()])
    multiplicity = np.select([distinct == 1, distinct == 2], [1.0, 3.0], 6.0)
    return idx, multiplicity


def _cubic_moment(x: np.ndarray) -> np.ndarray:
    """Packed sum over rows of x ⊗ x ⊗ x (unique entries only)."""
    idx, _ = _cubic_index(x.shape[1])
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
    moments3 = [_cubic_moment(real[onehot[:, b] > 0]) for b in range(2 * k)]
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


def _privacy_aggregates(site: SiteData, cohort: MatchSet, seed: int, index: int) -> Arrays:
    """Best match of each cohort volume here; binned real-to-cohort scores; the closest
    holdout-to-train pair within the site."""
    to_holdout = copy_scores(cohort, site.holdout_match).score
    rng = np.random.default_rng([seed, index])
    size = min(len(site.holdout_match), len(site.train_match))
    subsets = [
        rng.choice(len(site.train_match), size=size, replace=False) for _ in range(DCR_REPEATS)
    ]
    holdout_to_train = copy_scores(site.holdout_match, site.train_match).score
    return {
        "to_train": copy_scores(cohort, site.train_match).score,
        "to_holdout": to_holdout,
        "to_train_subsets": np.stack(
            [copy_scores(cohort, site.train_match.subset(s)).score for s in subsets]
        ),
        "holdout_to_train_max": np.array(
            [holdout_to_train.max() if len(holdout_to_train) else -1.0]
        ),
        "holdout_to_train_hist": _histogram(holdout_to_train),
        "member_hist": _histogram(copy_scores(site.train_match, cohort).score),
        "nonmember_hist": _histogram(copy_scores(site.holdout_match, cohort).score),
    }


def site_evidence(site: SiteData, request: Arrays, cohort_match: MatchSet, index: int) -> Arrays:
    """Round 2 at one site: aggregates of its real cases against the cohort (see module doc)."""
    k = len(request["count_train"])
    out: Arrays = {}
    for space in SPACES:
        out.update(_kernel_aggregates(site, request, space, k))
    out.update(_prdc_aggregates(site, request, k))
    out.update(_privacy_aggregates(site, cohort_match, int(request["seed"][0]), index))
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
    # per-site fidelity: this site's holdout (classes the cohort holds) to the cohort / to train
    rad = _z(request["cohort_radiomics"], request, "radiomics")
    hold = _z(site.holdout.radiomics, request, "radiomics")
    held = np.isin(site.holdout.labels, np.unique(request["cohort_labels"]))
    train = _z(site.train.radiomics, request, "radiomics")
    out["closeness"] = np.array(
        [
            np.median(dist.pairwise(hold[held], rad).min(1)) if held.any() else np.nan,
            np.median(dist.pairwise(hold[held], train).min(1))
            if held.any() and len(train)
            else np.nan,
        ]
    )
    return out


# --- server --------------------------------------------------------------------------------


@dataclass
class _Pooled:
    """Kernel sums over all sites' real cases by (split, class) block, and cohort-to-block."""

    n: np.ndarray  # 2K
    s1: np.ndarray  # 2K×D
    s2: np.ndarray  # 2K×D×D
    block: np.ndarray  # 2K×2K sums over distinct pairs
    cross: np.ndarray  # N×2K


def _pool(replies: list[Arrays], space: str) -> _Pooled:
    """Within-site sums as sent; between-site sums from the moments: with u = x·y/d,
    (u + 1)^3 = 1 + 3u + 3u^2 + u^3 and sum_AB u^p = <M_p(A), M_p(B)> / d^p."""
    d = replies[0][f"{space}_s1"].shape[1]
    _, mult = _cubic_index(d)
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
    return _Pooled(
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


def _block_moments(p: _Pooled, rows: slice, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu = w @ p.s1[rows]
    second = np.einsum("c,cij->ij", w, p.s2[rows])
    return mu, (second - np.outer(mu, mu)) / max(1.0 - float((w * w * p.n[rows]).sum()), 1e-12)


def _fidelity(
    p: _Pooled, syn: np.ndarray, labels: np.ndarray, k: int, rounds: int, seed: int
) -> MetricValue:
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


def _prdc(replies: list[Arrays], labels: np.ndarray, plan: Plan) -> dict[str, MetricValue]:
    k = len(plan.count_train)
    keys = ("coverage", "recall", "base_precision", "base_density", "base_coverage", "base_recall")
    total = {key: np.sum([r[key] for r in replies], axis=0) for key in keys}
    ball = np.sum([r["ball_count"] for r in replies], axis=0)
    per: dict[str, dict[str, float]] = {
        m: {} for m in ("precision", "density", "recall", "coverage")
    }
    base: dict[str, dict[str, float]] = {m: {} for m in per}
    syn_counts = np.bincount(labels, minlength=k)
    for c in range(k):
        n_h, n_t = int(plan.count_holdout[c]), int(plan.count_train[c])
        if n_h < MIN_PER_CLASS:
            continue
        k_eff = min(K_NN, n_h - 1)
        if syn_counts[c] >= MIN_PER_CLASS:
            b = ball[labels == c]
            per["precision"][c] = float((b > 0).mean())
            per["density"][c] = float(b.mean() / k_eff)
            per["coverage"][c] = float(total["coverage"][c] / n_h)
            per["recall"][c] = float(total["recall"][c] / n_h)
        if n_t >= MIN_PER_CLASS:
            base["precision"][c] = float(total["base_precision"][c] / n_t)
            base["density"][c] = float(total["base_density"][c] / (n_t * k_eff))
            base["coverage"][c] = float(total["base_coverage"][c] / n_h)
            base["recall"][c] = float(total["base_recall"][c] / n_h)

    def mean(values: dict[int, float]) -> float:
        return float(np.mean(list(values.values()))) if values else float("nan")

    return {
        m: MetricValue(
            mean(per[m]),
            mean(base[m]),
            None,
            {
                "per_class": {int(c): clean_number(v) for c, v in per[m].items()},
                "federated": SITE_LOCAL,
            },
        )
        for m in per
    }


def _auc_from_histograms(members: np.ndarray, non_members: np.ndarray) -> float:
    """P(member score > non-member score) + half the ties, scores binned."""
    m, n = members.sum(), non_members.sum()
    if m == 0 or n == 0:
        return float("nan")
    below = np.concatenate([[0], np.cumsum(non_members)[:-1]])
    return float((members * (below + 0.5 * non_members)).sum() / (m * n))


def combine_evidence(
    replies: list[Arrays],
    sites: list[str],
    plan: Plan,
    cohort: CohortSide,
    *,
    classes: list[str],
    requested: np.ndarray,
    bootstrap: int = 200,
    seed: int = 0,
) -> tuple[dict[str, MetricValue], dict]:
    """The sites' round-2 aggregates -> the same metrics and per-volume evidence as
    :func:`synthct.eval.cohort_metrics.cohort_metrics`."""
    k = len(classes)
    labels = cohort.features.labels
    n = len(labels)
    m: dict[str, MetricValue] = {}
    # --- fidelity (exact)
    for space in SPACES:
        pooled = _pool(replies, space)
        syn = _z(cohort.features.space(space), plan, space)
        m[f"kid_{space}"] = _fidelity(pooled, syn, labels, k, bootstrap, seed)
    prdc = _prdc(replies, labels, plan)
    for value in prdc.values():  # class indices -> names
        value.detail["per_class"] = {classes[c]: v for c, v in value.detail["per_class"].items()}
    m["precision"], m["density"] = prdc["precision"], prdc["density"]
    insane = hu_insane(cohort.features.medians, plan.ranges_all, plan.required)
    base_insane = float(
        np.sum([r["hu_base_insane"][0] for r in replies]) / plan.count_holdout.sum()
    )
    m["hu_insane_rate"] = MetricValue(
        float(insane.mean()),
        base_insane,
        wilson_interval(int(insane.sum()), n),
        {
            "ranges": {
                t: [round(float(a), 1), round(float(b), 1)]
                for t, (a, b) in zip(("body", "lung", "bone"), plan.ranges_all, strict=True)
            },
            "federated": "exact",
        },
    )
    # --- diversity
    m["recall"], m["coverage"] = prdc["recall"], prdc["coverage"]
    msssim = np.sum([r["msssim_sum"] for r in replies], axis=0)
    pairs = np.sum([r["msssim_pairs"] for r in replies], axis=0)
    excess, real_div, syn_div = {}, {}, {}
    for c, name in enumerate(classes):
        syn_c = cohort.features.images[labels == c]
        if len(syn_c) < MIN_PER_CLASS or pairs[c] == 0:
            continue
        syn_div[name] = pairwise_msssim(syn_c, seed=seed)
        real_div[name] = float(msssim[c] / pairs[c])
        excess[name] = syn_div[name] - real_div[name]
    m["msssim_excess"] = MetricValue(
        max(excess.values()) if excess else float("nan"),
        0.0,
        None,
        {
            "synthetic": {k_: clean_number(v) for k_, v in syn_div.items()},
            "real": {k_: clean_number(v) for k_, v in real_div.items()},
            "federated": SITE_LOCAL + " (real pairs)",
        },
    )
    # --- privacy
    to_train = np.stack([r["to_train"] for r in replies])  # sites × N
    best = to_train.max(0)
    best_site = [sites[i] for i in to_train.argmax(0)]
    tau = near_copy_threshold(np.array([max(r["holdout_to_train_max"][0] for r in replies)]))
    copies = best >= tau
    h2t = np.sum([r["holdout_to_train_hist"] for r in replies], axis=0)
    centres = (SCORE_EDGES[:-1] + SCORE_EDGES[1:]) / 2
    m["near_copy_rate"] = MetricValue(
        float(copies.mean()),
        float(h2t[centres >= tau].sum() / max(h2t.sum(), 1)),
        wilson_interval(int(copies.sum()), n),
        {
            "threshold_ncc": round(tau, 6),
            "max_ncc": clean_number(float(best.max()) if n else float("nan")),
            "federated": "per-volume scores exact; threshold " + SITE_LOCAL,
        },
    )
    to_holdout = np.max([r["to_holdout"] for r in replies], axis=0)
    subsets = np.max([r["to_train_subsets"] for r in replies], axis=0)  # repeats × N
    shares = [((t > to_holdout) + 0.5 * (t == to_holdout)).mean() for t in subsets]
    m["dcr_share"] = MetricValue(float(np.mean(shares)), 0.5, None, {"federated": SITE_LOCAL})
    m["membership_auc"] = MetricValue(
        _auc_from_histograms(
            np.sum([r["member_hist"] for r in replies], axis=0),
            np.sum([r["nonmember_hist"] for r in replies], axis=0),
        ),
        0.5,
        None,
        {"federated": "all train cases, scores binned at 0.001"},
    )
    # --- bias (exact)
    confusion = np.sum([r["confusion"] for r in replies], axis=0)
    gaps, accs, base_accs = {}, {}, {}
    for c, name in enumerate(classes):
        asked = requested == c
        if asked.sum() == 0:
            continue
        accs[name] = float((cohort.pred[asked] == c).mean())
        real_n = confusion[c].sum()
        base_accs[name] = float(confusion[c, c] / real_n) if real_n else 1.0
        gaps[name] = accs[name] - base_accs[name]
    worst = min(gaps, key=gaps.get) if gaps else None
    ci = None
    if worst is not None:
        asked = requested == classes.index(worst)
        lo, hi = wilson_interval(
            int((cohort.pred[asked] == classes.index(worst)).sum()), int(asked.sum())
        )
        ci = (lo - base_accs[worst], hi - base_accs[worst])
    m["conditioning_gap"] = MetricValue(
        gaps[worst] if worst else float("nan"),
        0.0,
        ci,
        {
            "worst_class": worst,
            "accuracy": accs,
            "holdout_accuracy": base_accs,
            "federated": "exact",
        },
    )
    want = np.bincount(requested, minlength=k) / max(n, 1)
    got = np.bincount(cohort.pred, minlength=k) / max(n, 1)
    m["proportion_tv"] = MetricValue(
        float(0.5 * np.abs(want - got).sum()),
        None,
        None,
        {
            "requested": dict(zip(classes, want.round(4).tolist(), strict=True)),
            "achieved": dict(zip(classes, got.round(4).tolist(), strict=True)),
        },
    )
    closeness = {s: r["closeness"] for s, r in zip(sites, replies, strict=True)}
    per_site = {s: float(v[0]) for s, v in closeness.items() if np.isfinite(v[0])}
    per_site_base = {s: float(v[1]) for s, v in closeness.items() if np.isfinite(v[1])}
    m["site_fidelity_ratio"] = MetricValue(
        closeness_ratio(per_site),
        closeness_ratio(per_site_base),
        None,
        {
            "distance_per_site": {s: clean_number(v) for s, v in per_site.items()},
            "baseline_per_site": {s: clean_number(v) for s, v in per_site_base.items()},
            "federated": "value exact (distances unscaled); baseline " + SITE_LOCAL,
        },
    )
    # site style: exact from the per-(split, class) feature sums every site sent in round 2
    s1 = {s: r["radiomics_s1"] for s, r in zip(sites, replies, strict=True)}
    nb = {s: r["radiomics_n"] for s, r in zip(sites, replies, strict=True)}
    hold = slice(k, 2 * k)
    means = class_means_from_sums(
        np.sum([v[hold] for v in s1.values()], axis=0),
        np.sum([v[hold] for v in nb.values()], axis=0),
    )
    real_style = adjusted_sums_from_blocks(
        {s: v[hold] for s, v in s1.items()}, {s: v[hold] for s, v in nb.items()}, means
    )
    train_style = adjusted_sums_from_blocks(
        {s: v[:k] for s, v in s1.items()}, {s: v[:k] for s, v in nb.items()}, means
    )
    syn_z = _z(cohort.features.radiomics, plan, "radiomics")
    style, style_detail = style_match(
        site_sums(syn_z, requested, cohort.features.sites, means), real_style
    )
    m["site_style_match"] = MetricValue(
        style,
        style_match(train_style, real_style)[0],
        None,
        {"per_site": style_detail, "federated": "exact"},
    )
    evidence = {
        "near_copy": copies,
        "copy_ncc": best,
        "copy_of": [f"a train case at {s}" for s in best_site],
        "hu_insane": insane,
        "medians": cohort.features.medians,
    }
    return m, evidence
