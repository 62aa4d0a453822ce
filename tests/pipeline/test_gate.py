"""The gate stage the CLI and the demo share: judge a cohort, write its verdict, signed."""

from __future__ import annotations

import dataclasses

import pytest

from synthct.artifacts import read_json
from synthct.eval import negatives
from synthct.eval.gate import DEFAULT_RULES, GateError
from synthct.pipeline.gate import judge_cohort
from synthct.signing import make_signing_key, verify_document

pytestmark = pytest.mark.slow


def test_the_verdict_written_is_the_one_returned_and_signed(
    tmp_path, demo_config, demo_sites, demo_reference
):
    cohort = negatives.fresh_real_cohort(
        demo_config, {"nodule": 8, "consolidation": 8}, tmp_path / "cohort", seed=11
    )
    private, public = make_signing_key(tmp_path / "keys", "gate")
    rules = {**DEFAULT_RULES, "dcr": dataclasses.replace(DEFAULT_RULES["dcr"], enabled=False)}
    out = tmp_path / "judged" / "gate.json"
    report = judge_cohort(
        cohort,
        out,
        config=demo_config,
        reference=demo_reference,
        train_manifest=demo_sites,
        holdout_manifest=demo_sites,
        rules=rules,
        bootstrap=20,
        sign_with=private,
    )
    written = read_json(out)
    assert written["verdict"] == report["verdict"] and written["cohort"]["cases"] == 16
    assert str(verify_document(written, [public], what="gate verdict")).endswith("gate.pub")
    assert written["rules_changed"]["dcr"]["enabled"] is False  # recorded in the verdict


def test_a_central_gate_without_real_manifests_is_refused_before_writing(
    tmp_path, demo_config, demo_reference
):
    out = tmp_path / "gate.json"
    with pytest.raises(GateError, match="needs --data"):
        judge_cohort(tmp_path / "manifest.csv", out, config=demo_config, reference=demo_reference)
    assert not out.exists()
