"""The gate-against-harm pictures: one panel per rule a utility gain may trade against, none
for privacy rules; dose-response points are means over seeds."""

from __future__ import annotations

import pytest

from synthct.eval.calibration import load_calibration
from synthct.report_harm import mean_over_seeds, rule_harm_figure


def test_rules_with_evidence_get_a_panel_privacy_rules_none():
    calibration = load_calibration()
    assert calibration is not None and calibration["rows"]  # it ships with synthct
    fidelity = {"rule": "fidelity_radiomics", "value": 1.0, "baseline": -0.04, "threshold": 0.21}
    privacy = {"rule": "dcr", "value": 0.5, "baseline": None, "threshold": 0.7}
    fig = rule_harm_figure(calibration, [fidelity, privacy])
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titled == ["fidelity_radiomics"]
    assert rule_harm_figure(calibration, [privacy]) is None


def test_dose_response_points_are_means_over_seeds():
    rows = [
        {"axis": "hu_shift", "dose": 20, "seed": s, "gate_passed": s == 0,
         "change": {"balanced_accuracy": c}}
        for s, c in ((0, 0.02), (1, 0.04))
    ]  # fmt: skip
    (point,) = mean_over_seeds(rows)
    assert point["change"]["balanced_accuracy"] == pytest.approx(0.03)
    assert point["gate_passed_every_seed"] is False
