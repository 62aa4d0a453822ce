"""Where does harm begin, and which gate rules and utility bands separate it? (issue 21: the
gate calibrated on downstream harm)

    python bench/gate_calibration.py [--dose bench/results/gate_dose_response_2026-12-04.json]
        [--noise bench/results/downstream_central_patience100_2026-12-03.json]
        [--out bench/results/gate_calibration_<date>.json]

Reads the dose-response rows (``gate_dose_response.py``: every cohort's gate values and the
downstream change it made on the calibration set, per seed) and writes, without training
anything:

- **the noise band** per headline number (balanced accuracy, worst site, rare recall): two
  standard errors of a row's mean change over its seeds, the standard deviation pooled over
  every row run on two or more seeds (at least five such rows); until then the real-only
  arm's spread over seeds (``--noise``, a difference of two runs) stands in and the band is
  marked provisional;
- **each row's class**: ``harm`` (some headline number fell by more than its band), ``help``
  (balanced accuracy rose by more than its band and nothing fell beyond its band) or
  ``neutral``;
- **each rule**: its excess over the real baseline (relative rules) or its value, for harmful
  and harmless rows, and the interval of limits that would fail every harmful row and pass
  every harmless one on this rule alone (empty when the rule cannot separate them alone);
- **the utility rule**: what ``downstream.utility`` (holdout only) decides for each row from the
  arms' best holdout scores, beside the row's class.

The calibration set and ``holdout`` decide; the ``test`` split is not read.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from phantom_world import bench_command

from synthct.artifacts import write_json
from synthct.config import UtilityRule
from synthct.eval.gate import DEFAULT_RULES
from synthct.eval.utility import utility_verdict

KEYS = ("balanced_accuracy", "worst_site_balanced_accuracy", "recall_consolidation")
MIN_ROWS_FOR_POOLED_SD = 5  # fewer rows run on two or more seeds: the stand-in is used
# rules no downstream gain may buy: privacy (never traded for utility) and the sites' own
# representation (a cohort for a site must look like that site, whatever a pooled classifier
# makes of it)
NOT_TRADED = ("near_copies", "dcr", "membership_inference", "site_balance", "site_style")


def noise_band(rows: list[dict], real_only: dict, noise_file: Path | None) -> dict:
    """Per key: the band a mean change over seeds must exceed to count (2 standard errors)."""
    seeds = sorted({r["seed"] for r in rows})
    by_row: dict[tuple, list[dict]] = {}
    for r in rows:
        by_row.setdefault((r["axis"], str(r["dose"])), []).append(r)
    variances = {k: [] for k in KEYS}
    for mine in by_row.values():
        if len(mine) >= 2:
            for k in KEYS:
                variances[k].append(np.var([r["change"][k] for r in mine], ddof=1))
    if all(len(variances[k]) >= MIN_ROWS_FOR_POOLED_SD for k in KEYS):
        sd = {k: float(np.sqrt(np.mean(variances[k]))) for k in KEYS}
        rows_used = sum(len(m) >= 2 for m in by_row.values())
        source = f"sd of a row's change over seeds, pooled over {rows_used} rows"
        provisional = False
    else:
        runs = json.loads(noise_file.read_text())["runs"]["central"]
        spread = {
            "balanced_accuracy": [r["test_balanced_accuracy"] for r in runs],
            "worst_site_balanced_accuracy": [r["worst_site_balanced_accuracy"] for r in runs],
            "recall_consolidation": [r["test_recall"]["consolidation"] for r in runs],
        }
        sd = {k: float(np.sqrt(2) * np.std(v, ddof=1)) for k, v in spread.items()}
        source = (
            f"one seed only: sqrt(2) x the real-only central arm's sd over {len(runs)} seeds "
            f"({noise_file.name}, test split of the benchmark; a stand-in)"
        )
        provisional = True
    return {
        "seeds": seeds,
        "sd_of_one_change": {k: round(v, 4) for k, v in sd.items()},
        # a row's mean over n seeds is noise within 2 sd / sqrt(n); the band at every seed run
        "band": {k: round(2 * sd[k] / np.sqrt(max(1, len(seeds))), 4) for k in KEYS},
        "source": source,
        "provisional": provisional,
        "real_only": {s: {k: v[k] for k in KEYS} for s, v in real_only.items()},
    }


def excess(rule: str, value: float, limit: float) -> float:
    """How far a value sits from the real baseline (relative rules) or its value (absolute)."""
    spec = DEFAULT_RULES[rule]
    return value - (limit - spec.threshold) if spec.relative else value


def classify(rows: list[dict], sd: dict, real_only: dict) -> list[dict]:
    """One entry per (axis, dose): mean change over seeds, class (against 2 standard errors of
    a mean over that row's seeds), gate and utility verdicts."""
    rule = UtilityRule()
    grouped: dict[tuple, list[dict]] = {}
    for r in rows:
        grouped.setdefault((r["axis"], str(r["dose"])), []).append(r)
    out = []
    for (axis, dose), mine in grouped.items():
        change = {k: float(np.mean([r["change"][k] for r in mine])) for k in KEYS}
        # against the good cohort of the same seed (as many real cases of the same classes and
        # sites): steadier than against real only, whose own stopping point varies by seed
        good = {r["seed"]: r for r in rows if r["axis"] == "none"}
        paired = [r for r in mine if r["seed"] in good]
        vs_good = (
            {k: round(float(np.mean([r[k] - good[r["seed"]][k] for r in paired])), 4) for k in KEYS}
            if paired
            else None
        )
        band = {k: 2 * sd[k] / np.sqrt(len(mine)) for k in KEYS}
        fell = [k for k in KEYS if change[k] < -band[k]]
        rose = change["balanced_accuracy"] > band["balanced_accuracy"]
        kind = "harm" if fell else "help" if rose else "neutral"
        utility = utility_verdict(
            [(r["seed"], {"all": real_only[str(r["seed"])]["stopping"]}) for r in mine],
            [(r["seed"], {"all": r["stopping"]}) for r in mine],
            loss_band=rule.loss_band,
            balanced_accuracy_band=rule.balanced_accuracy_band,
        )
        values = {
            name: float(np.mean([excess(name, *r["gate_values"][name]) for r in mine]))
            for name in DEFAULT_RULES
            if all(
                r["gate_values"][name][0] is not None and np.isfinite(r["gate_values"][name][0])
                for r in mine
            )
        }
        out.append(
            {
                "axis": axis,
                "dose": dose,
                "seeds": [r["seed"] for r in mine],
                "change": {k: round(v, 4) for k, v in change.items()},
                "vs_good_cohort": vs_good,
                "class": kind,
                "band": {k: round(v, 4) for k, v in band.items()},
                "fell_beyond_band": fell,
                "gate_passed_every_seed": all(r["gate_passed"] for r in mine),
                "failed_rules": sorted({f for r in mine for f in r["failed_rules"]}),
                "excess": {k: round(v, 4) for k, v in values.items()},
                "utility": {
                    "passed": utility["passed"],
                    "loss_change": utility.get("loss_change"),
                    "balanced_accuracy_change": utility.get("balanced_accuracy_change"),
                },
            }
        )
    return out


def separation(entries: list[dict]) -> dict:
    """Per rule, the limits that would fail every harmful row and pass every harmless one."""
    out = {}
    for name, spec in DEFAULT_RULES.items():
        harm = [e["excess"][name] for e in entries if e["class"] == "harm" and name in e["excess"]]
        fine = [e["excess"][name] for e in entries if e["class"] != "harm" and name in e["excess"]]
        if spec.direction == "max":  # fails above the limit
            low, high = max(fine, default=-np.inf), min(harm, default=np.inf)
        else:  # fails below the limit
            low, high = max(harm, default=-np.inf), min(fine, default=np.inf)
        out[name] = {
            "direction": spec.direction,
            "relative": spec.relative,
            "default_threshold": spec.threshold,
            "traded_for_utility": name not in NOT_TRADED,
            "harmful_rows": sorted(round(v, 4) for v in harm),
            "harmless_rows": sorted(round(v, 4) for v in fine),
            "separating_limits": [low, high] if low < high else None,
            "default_inside": bool(low < spec.threshold <= high)
            if spec.direction == "max"
            else bool(low <= spec.threshold < high),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dose", default="results/gate_dose_response_2026-12-04.json")
    p.add_argument("--noise", default="results/downstream_central_patience100_2026-12-03.json")
    p.add_argument("--out", default=f"results/gate_calibration_{time.strftime('%Y-%m-%d')}.json")
    p.add_argument(
        "--seeds", type=int, nargs="*", default=None, help="only these seeds' rows (default: all)"
    )
    p.add_argument(
        "--package",
        default=None,
        help="also write the compact evidence the report draws (eval/gate_calibration.json)",
    )
    args = p.parse_args()
    dose = json.loads(Path(args.dose).read_text())
    rows, real_only = dose["rows"], dose["real_only"]
    if args.seeds is not None:  # a seed still running would mix complete and partial rows
        rows = [r for r in rows if r["seed"] in args.seeds]
    band = noise_band(rows, real_only, Path(args.noise))
    entries = classify(rows, band["sd_of_one_change"], real_only)
    utility_confusion = {
        kind: {
            "rows": sum(e["class"] == kind for e in entries),
            "utility_failed": sum(
                e["class"] == kind and e["utility"]["passed"] is False for e in entries
            ),
            "gate_failed": sum(
                e["class"] == kind and not e["gate_passed_every_seed"] for e in entries
            ),
        }
        for kind in ("harm", "neutral", "help")
    }
    from scipy.stats import spearmanr

    loss = [e["utility"]["loss_change"] for e in entries]
    accuracy = [e["utility"]["balanced_accuracy_change"] for e in entries]
    effect = [e["change"]["balanced_accuracy"] for e in entries]
    holdout_tracks_harm = {
        "rows": len(entries),
        "spearman_holdout_loss_vs_calibration_balanced_accuracy": round(
            float(spearmanr(loss, effect).statistic), 3
        ),
        "spearman_holdout_vs_calibration_balanced_accuracy": round(
            float(spearmanr(accuracy, effect).statistic), 3
        ),
    }
    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "dose_file": args.dose,
        "noise": band,
        "utility_rule": UtilityRule().model_dump(),
        "rows": entries,
        "by_class": utility_confusion,
        "holdout_tracks_harm": holdout_tracks_harm,
        "rules": separation(entries),
        "not_traded": list(NOT_TRADED),
        "command": bench_command("gate_calibration.py", args),
    }
    write_json(args.out, payload, kind="bench-gate-calibration")
    if args.package:
        keep = ("axis", "dose", "seeds", "change", "class", "gate_passed_every_seed", "excess")
        write_json(
            args.package,
            {
                "date": payload["date"],
                "source": f"bench/{args.out}",
                "dose_file": args.dose,
                "command": payload["command"],
                "judged_on": "fresh real phantoms (calibration set), converged central "
                "classifier, mean over seeds; test never read",
                "noise": {k: band[k] for k in ("seeds", "band", "source", "provisional")},
                "rows": [{k: e[k] for k in keep} for e in entries],
                "rules": {
                    name: {k: r[k] for k in ("relative", "direction", "traded_for_utility")}
                    for name, r in payload["rules"].items()
                },
            },
            kind="synthct-gate-calibration",
        )
    for e in entries:
        print(
            f"{e['axis']:14s} {e['dose']:7s} {e['class']:8s} "
            f"BA {e['change']['balanced_accuracy']:+.3f} worst "
            f"{e['change']['worst_site_balanced_accuracy']:+.3f} rare "
            f"{e['change']['recall_consolidation']:+.3f} gate "
            f"{'pass' if e['gate_passed_every_seed'] else 'FAIL'} utility "
            f"{e['utility']['passed']}"
        )
    print(json.dumps({"band": band["band"], "by_class": utility_confusion, **holdout_tracks_harm}))


if __name__ == "__main__":
    main()
