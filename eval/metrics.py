"""Every number the gate judges a cohort by, pooled from what sites send: one path for the
central gate (one site holding every real case) and the federated gate (many sites, no real
case or feature leaves its site; what each sends is :mod:`synthct.eval.site_statistics`).

The server learns the pooled counts, standardisation and HU ranges from round 1
(:func:`combine_summary`), sends the cohort with them (:func:`cohort_request`) and turns the
round-2 replies into metrics (:func:`combine_evidence`); :func:`central_metrics` runs both
rounds on one site.

Every metric is a value beside its real-vs-real baseline (the ``train`` cases standing in for
the cohort against the same ``holdout``). Class mixes differ (a balanced cohort has few of the
common classes), so fidelity and diversity are per class, averaged over the classes the cohort
holds.

Exact for any number of sites (equal to one site holding everything): both KIDs and FDs with
their baselines and intervals (:mod:`synthct.eval.fidelity`), HU sanity, each volume's
near-copy score, conditioning, proportions, per-site fidelity and site style. Distances between
two sites' real cases are never computed, so with several sites these use neighbours within a
site (their detail says ``site-local``): PRDC ball radii, the near-copy threshold, real
MS-SSIM, DCR (train subsampled per site) and the per-site fidelity baseline. Membership AUC
uses all of ``train`` with match scores binned at 0.001 in both modes; so does the near-copy
baseline (bins wholly above the threshold: binning can only make that rule stricter). Per-site
fidelity distances are in standardised feature units (their ratio is the metric).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from synthct.eval import distribution as dist
from synthct.eval.diversity import pairwise_msssim
from synthct.eval.features import TISSUES, FeatureSet
from synthct.eval.fidelity import class_matched_fidelity, pool_kernel_sums
from synthct.eval.metric_values import (
    MIN_PER_CLASS,
    MetricValue,
    clean_number,
    closeness_ratio,
    hu_insane,
    hu_ranges_from,
    near_copy_threshold,
    wilson_interval,
)
from synthct.eval.privacy import MatchSet
from synthct.eval.site_statistics import (
    K_NN,
    SCORE_EDGES,
    SPACES,
    Arrays,
    SiteData,
    site_evidence,
    site_summary,
)
from synthct.eval.site_style import (
    adjusted_sums_from_blocks,
    class_means_from_sums,
    site_sums,
    style_match,
)

__all__ = [
    "EXACT_ACROSS_SITES",
    "CohortSide",
    "Plan",
    "central_metrics",
    "cohort_request",
    "combine_evidence",
    "combine_summary",
    "dcr_share",
    "membership_auc",
]

SITE_LOCAL = "site-local: within-site neighbours only"
# metrics whose values do not depend on how the real cases are spread over sites (the site-local
# ones do, see the module doc); with the small-class guard off
EXACT_ACROSS_SITES = (
    "kid_encoder",
    "kid_radiomics",
    "hu_insane_rate",
    "conditioning_gap",
    "proportion_tv",
    "site_style_match",
)


@dataclass
class CohortSide:
    """The cohort on the server: features, matching set and the reference's predictions."""

    features: FeatureSet
    match: MatchSet
    pred: np.ndarray


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

    def z(self, x: np.ndarray, space: str) -> np.ndarray:
        """Features standardised on the pooled holdout."""
        return (x - self.mean[space]) / self.std[space]


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


def cohort_request(plan: Plan, cohort: CohortSide, seed: int) -> Arrays:
    """Everything a site needs to score the cohort: the plan, the cohort's features and
    labels, its own k-NN radii (for recall) and which split each class's real MS-SSIM uses."""
    labels = cohort.features.labels
    k = len(plan.count_train)
    syn_z = plan.z(cohort.features.encoder, "encoder")
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


def dcr_share(replies: list[Arrays]) -> float:
    """Share of cohort volumes closer to ``train`` (a subset as large as holdout) than to
    ``holdout``, ties counting half, averaged over the subsets: 0.5 when nobody is copied."""
    to_holdout = np.max([r["to_holdout"] for r in replies], axis=0)
    subsets = np.max([r["to_train_subsets"] for r in replies], axis=0)  # repeats × N
    shares = [((t > to_holdout) + 0.5 * (t == to_holdout)).mean() for t in subsets]
    return float(np.mean(shares))


def membership_auc(replies: list[Arrays]) -> float:
    """AUC of an attacker who calls a real case a training member when it is close to some
    cohort volume (0.5 = no leak): P(member score > non-member score) + half the ties, over
    every train and holdout case, scores binned."""
    members = np.sum([r["member_hist"] for r in replies], axis=0)
    non_members = np.sum([r["nonmember_hist"] for r in replies], axis=0)
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
    """The sites' round-2 aggregates -> every metric and the per-volume evidence (for one
    site holding every case, the central gate: :func:`central_metrics`)."""
    k = len(classes)
    labels = cohort.features.labels
    n = len(labels)
    m: dict[str, MetricValue] = {}

    # --- fidelity (exact)
    for space in SPACES:
        pooled = pool_kernel_sums(replies, space)
        syn = plan.z(cohort.features.space(space), space)
        m[f"kid_{space}"] = class_matched_fidelity(pooled, syn, labels, k, bootstrap, seed)
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
                for t, (a, b) in zip(TISSUES, plan.ranges_all, strict=True)
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
    # real holdout cases at or above the threshold, from binned scores: only bins wholly above
    # it count, so binning can lower the baseline (a stricter rule), never raise it
    lower_edges = SCORE_EDGES[:-1]
    m["near_copy_rate"] = MetricValue(
        float(copies.mean()),
        float(h2t[lower_edges >= tau].sum() / max(h2t.sum(), 1)),
        wilson_interval(int(copies.sum()), n),
        {
            "threshold_ncc": round(tau, 6),
            "max_ncc": clean_number(float(best.max()) if n else float("nan")),
            "federated": "per-volume scores exact; threshold " + SITE_LOCAL,
        },
    )
    m["dcr_share"] = MetricValue(dcr_share(replies), 0.5, None, {"federated": SITE_LOCAL})
    m["membership_auc"] = MetricValue(
        membership_auc(replies),
        0.5,
        None,
        {"scores": "all train cases, binned at 0.001"},
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
    # per scanner site of the real cases, whichever site holds them
    scanner = sorted(
        {key[len("site:") :].rsplit(":", 1)[0] for r in replies for key in r if key[:5] == "site:"}
    )

    def by_scanner(field: str, *, one_site: bool = False) -> dict[str, np.ndarray]:
        out = {}
        for name in scanner:
            parts = [r[key] for r in replies if (key := f"site:{name}:{field}") in r]
            if one_site and len(parts) > 1:  # medians of two sites do not add up
                raise ValueError(f"scanner site {name!r}: cases at {len(parts)} sites")
            out[name] = np.sum(parts, axis=0)
        return out

    closeness = by_scanner("closeness", one_site=True)
    per_site = {s: float(v[0]) for s, v in closeness.items() if np.isfinite(v[0])}
    per_site_base = {s: float(v[1]) for s, v in closeness.items() if np.isfinite(v[1])}
    m["site_fidelity_ratio"] = MetricValue(
        closeness_ratio(per_site),
        closeness_ratio(per_site_base),
        None,
        {
            "distance_per_site": {s: clean_number(v) for s, v in per_site.items()},
            "baseline_per_site": {s: clean_number(v) for s, v in per_site_base.items()},
            "federated": "value exact; baseline " + SITE_LOCAL,
        },
    )
    # site style: class-adjusted radiomics means per scanner site, from per-block sums
    s1, nb = by_scanner("radiomics_s1"), by_scanner("radiomics_n")
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
    syn_z = plan.z(cohort.features.radiomics, "radiomics")
    style, style_detail = style_match(
        site_sums(syn_z, requested, cohort.features.sites, means), real_style
    )
    m["site_style_match"] = MetricValue(
        style,
        style_match(train_style, real_style)[0],
        None,
        {"per_site": style_detail, "federated": "exact"},
    )
    if all("to_train_index" in r for r in replies):  # central: which train case, by index
        index = np.stack([r["to_train_index"] for r in replies])
        copy_of = index[to_train.argmax(0), np.arange(n)]
    else:
        copy_of = [f"a train case at {s}" for s in best_site]
    if len(replies) == 1:  # one site holds every case: nothing was pooled across sites
        for value in m.values():
            (value.detail or {}).pop("federated", None)
    evidence = {
        "near_copy": copies,
        "copy_ncc": best,
        "copy_of": copy_of,
        "hu_insane": insane,
        "medians": cohort.features.medians,
    }
    return m, evidence


def central_metrics(
    site: SiteData,
    cohort: CohortSide,
    *,
    classes: list[str],
    requested: np.ndarray,
    bootstrap: int = 200,
    seed: int = 0,
) -> tuple[dict[str, MetricValue], dict]:
    """The central gate: every real case at one site, both rounds run here, so the central and
    federated gates share every line of metric code. ``copy_of`` in the per-volume evidence is
    the index of each volume's best-matching ``train`` case."""
    plan = combine_summary([site_summary(site, len(classes))])
    request = cohort_request(plan, cohort, seed)
    reply = site_evidence(site, request, cohort.match, 0, name_matches=True)
    return combine_evidence(
        [reply],
        ["central"],
        plan,
        cohort,
        classes=classes,
        requested=requested,
        bootstrap=bootstrap,
        seed=seed,
    )
