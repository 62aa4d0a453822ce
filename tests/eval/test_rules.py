"""Gate rules: rules-file overrides, refused thresholds, and judging values against baselines."""

from __future__ import annotations

import math

import pytest

from synthct.eval.metric_values import MetricValue
from synthct.eval.rules import (
    DEFAULT_RULES,
    THRESHOLD_RANGE,
    GateError,
    RuleSpec,
    judge,
    load_rules,
)


def test_rules_file_errors_name_the_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("rules:\n  dcr: {threshold: high}\n")
    with pytest.raises(GateError, match="rules.dcr.threshold"):
        load_rules(path)
    path.write_text("rules:\n  dcr: 0.6\n  coverage: {enabled: false}\n")
    rules = load_rules(path)
    assert rules["dcr"].threshold == 0.6 and not rules["coverage"].enabled
    # a threshold that would pass or fail every cohort is refused, naming its range
    for rule, value in (("dcr", 0.3), ("membership_inference", 0.3), ("precision", 0.5)):
        path.write_text(f"rules:\n  {rule}: {value}\n")
        with pytest.raises(GateError, match=rf"rules.{rule}.threshold = {value}: must lie in"):
            load_rules(path)


def test_every_default_rule_has_a_threshold_range_that_holds_its_default():
    assert set(THRESHOLD_RANGE) == set(DEFAULT_RULES)
    for name, spec in DEFAULT_RULES.items():
        low, high = THRESHOLD_RANGE[name]
        assert low <= spec.threshold <= high, name


def test_judge_adds_relative_thresholds_to_the_baseline_and_leaves_open_what_it_cannot_judge():
    rules = {
        "above": RuleSpec("kid", "max", 0.25, True, "r"),
        "floor": RuleSpec("share", "min", 0.5, False, "r"),
        "off": RuleSpec("share", "min", 0.9, False, "r", enabled=False),
        "nan": RuleSpec("missing", "max", 0.1, False, "r"),
    }
    metrics = {
        "kid": MetricValue(0.3, baseline=0.1),  # limit 0.1 + 0.25 = 0.35
        "share": MetricValue(0.4),
        "missing": MetricValue(math.nan),
    }
    rows = {r["rule"]: r for r in judge(metrics, rules)}
    assert rows["above"]["passed"] is True and rows["above"]["threshold"] == pytest.approx(0.35)
    assert rows["floor"]["passed"] is False and rows["floor"]["reason"].startswith("FAILED")
    assert rows["off"]["passed"] is None and rows["off"]["reason"] == "disabled"
    assert rows["nan"]["passed"] is None and "not computable" in rows["nan"]["reason"]
