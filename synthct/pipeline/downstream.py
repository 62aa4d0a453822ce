"""Downstream classifiers: does a gated synthetic cohort help the model the sites care about?

The classifier (``synthct.classifier``) is trained on real ``train`` cases, optionally plus a
cohort, centrally (all sites pooled), by each site alone, or federatedly (Flower; each site adds
the cohort cases meant for it, ``site`` = itself or ``pooled``), and evaluated on the real
``test`` split only, per site and overall; with both arms, the paired effect of the synthetic
data with 95 % intervals. A cohort is used only with a passing ``gate.json`` whose hashes all
match; with ``force_ungated`` the results say so in capitals. With both arms, the utility rule
(``synthct.eval.utility``) says whether the cohort made the classifier worse on ``holdout``; a
cohort that fails it is not to be used (the real-only arm is the result), whatever ``test`` says.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from synthct.artifacts import write_json
from synthct.classifier import (
    ArmResult,
    build_classifier,
    join,
    load_cohort_for,
    predict,
    train_converged,
)
from synthct.config import SynthctConfig
from synthct.data.dataset import CaseSet, load_cases
from synthct.eval.classification import downstream_payload
from synthct.eval.gate import gated_cohort

__all__ = ["run_downstream", "downstream_table"]

logger = logging.getLogger(__name__)


def _central_arm(
    config: SynthctConfig,
    real: CaseSet,
    holdout: CaseSet,
    cohort: CaseSet | None,
    test: CaseSet,
    seed: int,
    device: torch.device | str = "cpu",
) -> ArmResult:
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = build_classifier(config).to(device)
    stopping = train_converged(model, join(real, cohort), holdout, config, seed=seed)
    counts = {"real": len(real), "synthetic": len(cohort) if cohort is not None else 0}
    return ArmResult(
        predict(model, test.images),
        test.labels.numpy(),
        list(test.sites),
        counts,
        time.perf_counter() - start,
        {"all": stopping},
    )


def _local_arm(
    config: SynthctConfig,
    real_manifest: Path,
    cohort_manifest: Path | None,
    test: CaseSet,
    seed: int,
    device: torch.device | str = "cpu",
) -> ArmResult:
    """Each site alone: trained on its own cases (+ its cohort cases), stopped on its own
    holdout, tested on its own test cases."""
    start = time.perf_counter()
    probs = np.zeros((len(test), config.labels.num_classes))
    counts = {"real": 0, "synthetic": 0}
    stopping = {}
    for site in config.site_names:
        real = load_cases(real_manifest, config, splits=("train",), sites=(site,))
        holdout = load_cases(real_manifest, config, splits=("holdout",), sites=(site,))
        rows = [i for i, s in enumerate(test.sites) if s == site]
        if len(real) == 0 or not rows:
            continue
        cohort = load_cohort_for(cohort_manifest, config, site) if cohort_manifest else None
        torch.manual_seed(seed)
        model = build_classifier(config).to(device)
        stopping[site] = train_converged(model, join(real, cohort), holdout, config, seed=seed)
        probs[rows] = predict(model, test.images[rows])
        counts["real"] += len(real)
        counts["synthetic"] += 0 if cohort is None else len(cohort)
    return ArmResult(
        probs, test.labels.numpy(), list(test.sites), counts, time.perf_counter() - start, stopping
    )


def run_downstream(
    config: SynthctConfig,
    real_manifest: str | Path,
    out: str | Path,
    *,
    cohort_dir: str | Path | None = None,
    gate_json: str | Path | None = None,
    federated: bool = False,
    local: bool = False,
    force_ungated: bool = False,
    trusted_keys: list[str | Path] | None = None,
    progress: Callable[..., None] | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train real-only (and real + cohort) classifiers for every seed; ``results.json``.
    ``local``: every site trains alone (the no-collaboration baseline); ``trusted_keys``: the
    cohort's gate verdict must be signed by one of these public keys; ``device``: where the
    central and local arms train (federated sites train on CPU in the simulation)."""
    out = Path(out)
    real_manifest = Path(real_manifest)
    cohort_dir = None if cohort_dir is None else Path(cohort_dir)
    gate_info, cohort_manifest = gated_cohort(
        cohort_dir, Path(gate_json) if gate_json else None, force_ungated, trusted_keys
    )
    test = load_cases(real_manifest, config, splits=("test",))
    if len(test) == 0:
        from synthct.data.manifest import ManifestError

        raise ManifestError(f"{real_manifest}: no test cases to evaluate on")
    out.mkdir(parents=True, exist_ok=True)  # only once the inputs are accepted
    arms = ["real"] + (["real+synthetic"] if cohort_manifest is not None else [])
    results: dict[str, list[tuple[int, ArmResult]]] = {arm: [] for arm in arms}
    dp = None
    if federated:  # one DP account over every arm and seed (they train on the same cases)
        from synthct.fed.downstream_app import downstream_dp

        dp = downstream_dp(config)
    total = len(arms) * len(config.downstream.seeds)
    done = 0
    for arm in arms:
        for seed in config.downstream.seeds:
            use = cohort_manifest if arm == "real+synthetic" else None
            if local:
                result = _local_arm(config, real_manifest, use, test, seed, device)
            elif federated:
                from synthct.fed.downstream_app import train_downstream_federated

                result = train_downstream_federated(config, real_manifest, use, out, seed, dp)
            else:
                real = load_cases(real_manifest, config, splits=("train",))
                holdout = load_cases(real_manifest, config, splits=("holdout",))
                cohort = load_cohort_for(use, config, None) if use is not None else None
                result = _central_arm(config, real, holdout, cohort, test, seed, device)
            _check_complete(result, test)
            results[arm].append((seed, result))
            done += 1
            if progress is not None:
                progress(done, total, arm=arm, seed=seed)
    payload = downstream_payload(
        results,
        config=config,
        mode="local" if local else "federated" if federated else "central",
        real_manifest=str(real_manifest),
        cohort=None if cohort_dir is None else str(cohort_dir),
        gate=gate_info,
        test_cases=len(test),
        **({"privacy": dp.record()} if dp is not None else {}),
    )
    write_json(out / "results.json", payload, kind="synthct-downstream")
    utility = payload.get("utility") or {}
    if utility.get("passed") is False:
        logger.warning("the cohort fails the utility rule on holdout: %s", utility["reason"])
    return payload


def _check_complete(result: ArmResult, test: CaseSet) -> None:
    """An arm must return every test case of every site (in any site order)."""
    if sorted(result.sites) != sorted(test.sites):
        missing = sorted(set(test.sites) - set(result.sites))
        raise RuntimeError(
            f"an arm returned {len(result.sites)} test cases for {len(test.sites)} "
            f"(sites without results: {missing or 'none'})"
        )


def downstream_table(results: dict[str, Any]):
    """A rich table of each arm's headline numbers (mean ± sd over seeds)."""
    from rich.table import Table

    rare = results["rare"]
    table = Table(title=f"downstream ({results['mode']}, real test split, mean ± sd over seeds)")
    for col in ("arm", "balanced acc", "macro AUC", *(f"{r} recall" for r in rare), "worst site"):
        table.add_column(col)
    for arm, data in results["arms"].items():
        s = data["summary"]

        def fmt(m: dict) -> str:
            return f"{m['mean']:.3f} ± {m['sd']:.3f}"

        rare_cols = [fmt(s[f"recall_{r}"]) for r in rare]
        table.add_row(
            arm,
            fmt(s["balanced_accuracy"]),
            fmt(s["macro_auc"]),
            *rare_cols,
            fmt(s["worst_site_balanced_accuracy"]),
        )
    effect = results.get("effect")
    if effect:  # one more row: the paired change with its 95 % interval

        def change(key: str) -> str:
            e = effect[key]
            return f"{e['mean']:+.3f} [{e['ci95'][0]:+.3f}, {e['ci95'][1]:+.3f}]"

        table.add_row(
            "change (95 % CI)",
            change("balanced_accuracy"),
            "",
            *(change(f"recall_{r}") for r in rare),
            change("worst_site_balanced_accuracy"),
        )
    utility = results.get("utility")
    if utility is not None:
        table.caption = f"utility rule (holdout): {utility['reason']}"
    return table
