"""The gate against downstream harm, drawn for the report and the bench.

Two pictures from the calibration evidence (``synthct.eval.calibration``): the dose-response
curves (per degradation axis, what each dose did to a converged classifier, filled where the
gate passed the cohort), and, per rule, where a cohort's value sits among the calibration
cohorts, coloured by what they did downstream, with the rule's limit beside it.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["mean_over_seeds", "dose_response_figure", "rule_harm_figure"]

KEYS = ("balanced_accuracy", "worst_site_balanced_accuracy", "recall_consolidation")
CLASS_COLOURS = {"harm": "#b3261e", "neutral": "#888888", "help": "#11734b"}


def _dose_order(dose: Any) -> tuple[bool, float]:
    try:
        return False, float(dose)
    except (TypeError, ValueError):
        return True, 0.0


def mean_over_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (axis, dose): the mean change over seeds and whether the gate passed every seed's
    cohort (dose-response rows in, one point per cohort out)."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        grouped.setdefault((r["axis"], str(r["dose"])), []).append(r)
    return [
        {
            "axis": axis,
            "dose": mine[0]["dose"],
            "change": {
                k: float(np.mean([r["change"][k] for r in mine])) for k in mine[0]["change"]
            },
            "gate_passed_every_seed": all(r["gate_passed"] for r in mine),
        }
        for (axis, _), mine in grouped.items()
    ]


def dose_response_figure(points: list[dict[str, Any]], title: str = ""):
    """Per axis, the change each dose made against the dose, beside the good cohort
    (``axis`` ``none``); a filled marker where the gate passed the cohort."""
    axes = list(dict.fromkeys(p["axis"] for p in points if p["axis"] != "none"))
    keys = [k for k in KEYS if points and k in points[0]["change"]]
    fig, grid = plt.subplots(1, max(1, len(axes)), figsize=(3.0 * max(1, len(axes)), 3.0),
                             sharey=True, squeeze=False)  # fmt: skip
    good = [p for p in points if p["axis"] == "none"]
    for ax, axis in zip(grid[0], axes, strict=False):
        mine = sorted(
            (p for p in points if p["axis"] == axis), key=lambda p: _dose_order(p["dose"])
        )
        pts = [("good", p) for p in good] + [(str(p["dose"]), p) for p in mine]
        for key, colour in zip(keys, ("C0", "C1", "C3"), strict=False):
            xs = [label for label, _ in pts]
            ax.plot(xs, [p["change"][key] for _, p in pts], color=colour,
                    label=key.replace("_", " "))  # fmt: skip
            for label, p in pts:
                fill = "full" if p["gate_passed_every_seed"] else "none"
                ax.plot(label, p["change"][key], "o", color=colour, fillstyle=fill)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(axis.replace("_", " "), fontsize=9)
        ax.set_xlabel("dose", fontsize=8)
        ax.tick_params(labelsize=7)
    grid[0][0].set_ylabel("change vs real only", fontsize=8)
    grid[0][-1].legend(fontsize=6, loc="lower left")
    fig.suptitle(title or "downstream change per degradation (filled: the gate passed it)",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    return fig


def rule_harm_figure(calibration: dict[str, Any], gate_rules: list[dict[str, Any]]):
    """Per rule a utility gain may trade against: the calibration cohorts' values (x; excess
    over the real baseline for relative rules) against the balanced-accuracy change they made
    (y), coloured harm/neutral/help; the rule's limit (solid) and this cohort's value
    (dashed). None if no rule of this gate has calibration evidence."""
    mine = {r["rule"]: r for r in gate_rules}
    names = [
        n
        for n, spec in calibration["rules"].items()
        if spec.get("traded_for_utility")
        and n in mine
        and mine[n].get("value") is not None
        and np.isfinite(mine[n]["value"])
    ]
    if not names:
        return None
    cols = min(4, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig, grid = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(grid.flat, names, strict=False):
        spec, row = calibration["rules"][name], mine[name]
        baseline = (row.get("baseline") or 0.0) if spec["relative"] else 0.0
        limit = row["threshold"] - baseline
        value = row["value"] - baseline
        for entry in calibration["rows"]:
            if name not in entry["excess"]:
                continue
            ax.plot(entry["excess"][name], entry["change"]["balanced_accuracy"], "o",
                    color=CLASS_COLOURS[entry["class"]], ms=4)  # fmt: skip
        ax.axvline(limit, color="black", lw=1.2)
        ax.axvline(value, color="C0", lw=1.2, ls="--")
        ax.axhline(0, color="grey", lw=0.6)
        spread = [abs(e["excess"][name]) for e in calibration["rows"] if name in e["excess"]]
        if max([*spread, abs(value), abs(limit)]) > 20:  # blur and HU shifts reach 1e4
            ax.set_xscale("symlog", linthresh=1.0)
            ax.set_xlim(left=-1.0)
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in list(grid.flat)[len(names) :]:
        ax.axis("off")
    grid[0][0].set_ylabel("balanced accuracy change", fontsize=8)
    fig.suptitle(
        "this cohort (dashed) and each rule's limit (solid) among cohorts that harmed (red), "
        "did nothing (grey) or helped (green)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig
