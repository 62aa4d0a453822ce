"""What makes a contributed plugin worse for another site (fed/plugin_judging.py)."""

from synthct.fed.plugin_judging import _worse_rules


def test_a_plugin_is_worse_for_a_site_when_a_passed_rule_fails_or_a_value_leaves_the_interval():
    fields = ("rule", "value", "ci", "direction", "passed")

    def report(*rows):
        return {"rules": [dict(zip(fields, row, strict=True)) for row in rows]}

    base = report(
        ("fidelity_encoder", 0.05, [0.02, 0.09], "max", True),
        ("coverage", 0.9, [0.8, 0.95], "min", True),
        ("site_style", 0.5, None, "min", False),
        ("dcr", 0.5, None, "max", None),  # disabled
    )
    same = report(
        ("fidelity_encoder", 0.08, None, "max", True),
        ("coverage", 0.85, None, "min", True),
        ("site_style", 0.25, None, "min", False),  # failed before too, no interval: not worse
        ("dcr", 0.9, None, "max", None),
    )
    assert _worse_rules(base, same) == {}
    worse = report(
        ("fidelity_encoder", 0.1, None, "max", True),  # beyond the base's interval
        ("coverage", 0.6, None, "min", False),  # passed, now fails
        ("site_style", 0.5, None, "min", False),
        ("dcr", 0.9, None, "max", None),
    )
    found = _worse_rules(base, worse)
    assert set(found) == {"fidelity_encoder", "coverage"}
    assert found["coverage"] == {
        "base": 0.9, "base_ci": [0.8, 0.95], "plugin": 0.6, "plugin_passed": False
    }  # fmt: skip
