"""The gate passes fresh real phantoms and fails each hard negative on the right rule.

Real side: the demo phantom sites (seed 0) and the shipped reference models trained on them.
Cohorts are written to disk as NIfTI + manifest and read back like any user's cohort.
"""

from __future__ import annotations

import json

import pytest

from synthct.artifacts import read_json
from synthct.cli import main
from synthct.eval import negatives
from synthct.eval.gate import (
    DEFAULT_RULES,
    GateError,
    drop_flagged,
    run_gate,
    verify_gate,
    write_gate,
)

COUNTS = {"nodule": 20, "ground_glass": 20, "consolidation": 30}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(demo_reference):
    return demo_reference


@pytest.fixture(scope="module")
def real(demo_real):
    return demo_real


@pytest.fixture(scope="module")
def fresh(tmp_path_factory, demo_config):
    out = tmp_path_factory.mktemp("fresh")
    return negatives.fresh_real_cohort(demo_config, COUNTS, out, seed=4242)


def _gate(manifest, real, config, reference):
    return run_gate(manifest, real, config=config, reference=reference, bootstrap=50)


def _failed(report) -> set[str]:
    return set(report["failed_rules"])


def test_fresh_real_cohorts_pass(tmp_path, fresh, real, demo_config, reference):
    report = _gate(fresh, real, demo_config, reference)
    assert report["verdict"] == "pass", report["failed_rules"]
    assert report["flags"] == []
    assert report["metrics"]["site_style_match"]["value"] == 1.0  # judged, every site its own
    other = negatives.fresh_real_cohort(demo_config, COUNTS, tmp_path / "b", seed=777)
    assert _gate(other, real, demo_config, reference)["verdict"] == "pass"
    # every rule is reported with value, threshold and reason
    assert {r["rule"] for r in report["rules"]} == set(DEFAULT_RULES)
    assert all(r["reason"] and r["threshold"] is not None for r in report["rules"])


def test_copies_fail_on_privacy_and_are_flagged(tmp_path, fresh, real, demo_config, reference):
    base = negatives.load_cohort_volumes(fresh)
    labels = [demo_config.labels.classes[i] for i in real.train.labels.tolist()]
    partial = negatives.near_copies(real.train.paths, labels, base, tmp_path / "p", fraction=0.2)
    report = _gate(partial, real, demo_config, reference)
    assert "near_copies" in _failed(report)
    n_copies = round(0.2 * sum(COUNTS.values()))
    assert len(report["flags"]) >= 0.7 * n_copies
    assert all("near-copy of train case" in f["reasons"][0] for f in report["flags"])
    # dropping the flagged volumes gives a cohort that passes the privacy rules
    write_gate(report, tmp_path / "gate.json")
    kept = drop_flagged(tmp_path / "p", read_json(tmp_path / "gate.json"), tmp_path / "kept")
    again = _gate(kept, real, demo_config, reference)
    assert "near_copies" not in _failed(again)


def test_each_hard_negative_fails_its_rule(tmp_path, fresh, real, demo_config, reference):
    """The site negatives here; copies above; mode collapse, HU shift and relabelling in
    tests/eval/test_metrics.py (central and federated metrics, the same rules)."""
    cases = {
        "site_balance": negatives.fresh_real_cohort(
            demo_config, COUNTS, tmp_path / "single", seed=5, sites=["site_d"]
        ),
        # cases made for every site but in other sites' styles
        "site_style": negatives.sites_shuffled(fresh, tmp_path / "shuffled"),
    }
    one_style = negatives.one_style_for_all_sites(
        demo_config, COUNTS, tmp_path / "one_style", seed=6, style="site_b"
    )
    report = _gate(one_style, real, demo_config, reference)
    assert "site_style" in _failed(report), _failed(report)
    style = report["metrics"]["site_style_match"]
    assert style["value"] == pytest.approx(0.25) and style["baseline"] == 1.0  # site_b only
    for rule, manifest in cases.items():
        report = _gate(manifest, real, demo_config, reference)
        assert report["verdict"] == "fail" and rule in _failed(report), (rule, _failed(report))


def test_cli_exit_codes_hashes_and_tamper(tmp_path, fresh, demo_sites):
    cohort = fresh.parent
    out = tmp_path / "gate.json"
    args = ["gate", "--cohort", str(cohort), "--data", str(demo_sites), "--out", str(tmp_path)]
    assert main(args) == 0  # --out is a folder: OUT/gate.json
    report = json.loads(out.read_text())
    assert report["verdict"] == "pass" and report["kind"] == "synthct-gate"
    assert len(report["cohort"]["files"]) == sum(COUNTS.values())
    assert report["versions"]["synthct"]
    verify_gate(out, cohort)
    # a stricter rule file makes the same cohort fail (exit 3)
    rules = tmp_path / "strict.yaml"
    # at zero allowance, a real cohort's own noise fails at least one of these
    rules.write_text("rules:\n  proportions: 0.0\n  conditioning: 0.0\n  mode_collapse: 0.0\n")
    # the old flags (--train/--holdout, --out naming the file) still work for one release
    old = ["gate", "--cohort", str(cohort), "--train", str(demo_sites), "--holdout"]
    old += [str(demo_sites), "--out", str(tmp_path / "strict.json"), "--rules", str(rules)]
    assert main(old) == 3
    changed = json.loads((tmp_path / "strict.json").read_text())["rules_changed"]
    assert set(changed) == {"proportions", "conditioning", "mode_collapse"}
    assert changed["proportions"] == {
        "threshold": 0.0,
        "enabled": True,
        "default_threshold": 0.25,
        "default_enabled": True,
    }
    assert json.loads(out.read_text())["rules_changed"] == {}
    # bad rules and a missing cohort are bad input (exit 2)
    rules.write_text("rules:\n  no_such_rule: 1\n")
    assert main([*args, "--rules", str(rules)]) == 2
    assert main(["gate", "--cohort", str(tmp_path / "none"), *args[3:]]) == 2
    # a changed file after gating is refused, naming it
    victim = next((cohort / "cases").rglob("*.nii.gz"))
    saved = victim.read_bytes()
    try:
        victim.write_bytes(saved[:-10])
        with pytest.raises(GateError, match=victim.name):
            verify_gate(out, cohort)
    finally:
        victim.write_bytes(saved)
