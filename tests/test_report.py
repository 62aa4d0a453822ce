"""The HTML report renders in headless Chromium: every picture loads and is not blank."""

from __future__ import annotations

import numpy as np
import pytest

from synthct.eval.calibration import load_calibration
from synthct.report import write_report


@pytest.fixture
def volumes():
    rng = np.random.default_rng(0)
    vol = np.full((3, 16, 16, 16), -1000.0)
    vol[:, 3:13, 3:13, 2:14] = 40.0
    vol[:, 5:8, 5:11, 4:12] = -850.0
    return vol + rng.normal(0, 20, vol.shape)


def test_report_pictures_render_and_are_not_blank(tmp_path, volumes, render_check):
    rounds = [
        {"phase": p, "round": r, "sites": [{"site": s, "loss": 1.0 / r} for s in ("a", "b")]}
        for p in ("autoencoder", "diffusion")
        for r in (1, 2, 3)
    ]
    per_site = {"a": {"mean": 0.7, "sd": 0.0}, "b": {"mean": 0.5, "sd": 0.0}}
    summary = {
        "balanced_accuracy": {"mean": 0.6, "sd": 0.0},
        "macro_auc": {"mean": 0.8, "sd": 0.0},
        "recall_c": {"mean": 0.3, "sd": 0.0},
        "worst_site_balanced_accuracy": {"mean": 0.5, "sd": 0.0},
        "per_site_balanced_accuracy": per_site,
    }
    better = {
        **summary,
        "recall_c": {"mean": 0.5, "sd": 0.1},
        "per_site_balanced_accuracy": {**per_site, "b": {"mean": 0.6, "sd": 0.0}},
    }
    downstream = {
        "effect": {"recall_c": {"mean": 0.2, "ci95": [0.05, 0.35]}},
        "rare": ["c"],
        "arms": {
            "real": {"summary": summary, "runs": [{}, {}, {}]},
            "real+synthetic": {"summary": better, "runs": [{}, {}, {}]},
        },
    }
    gate = {
        "verdict": "pass",
        "failed_rules": [],
        "cohort": {"cases": 12},
        "rules": [
            {
                "rule": "dcr",
                "value": 0.5,
                "threshold": 0.7,
                "direction": "max",
                "passed": True,
                "ci": None,
                "reason": "ok: dcr_share = 0.5 (needs <= 0.7); share closer to train",
            }
        ],
    }
    report = write_report(
        tmp_path / "report.html",
        title="t",
        summary={"k": 1},
        synthetic={"b": volumes, "c": volumes[:2]},
        real={"b": volumes},
        rounds=rounds,
        gate=gate,
        downstream=downstream,
        provenance={"config": "x"},
        sites=({"a": volumes[0], "b": volumes[1]}, {"a": volumes[2], "b": volumes[0]}),
        calibration=load_calibration(),  # the shipped evidence
    )
    text = report.read_text()
    assert 'src="data:image/png;base64,' in text and "http" not in text.split("<body")[1][:0]
    # it opens with the verdict and the headline effect, before any picture
    head = text.split("<img", 1)[0]
    assert 'Gate: <span class="pass">PASS</span>' in head
    assert "c (rare) recall 0.300 &rarr; 0.500" in head and "+0.200" in head
    assert "95 % CI [+0.050, +0.350]" in head
    assert "b 0.500 &rarr; 0.600" in head and "mean of 3 seed(s)" in head
    seen = render_check(report, tmp_path)
    # real b | synthetic b side by side, synthetic c, site pairs, HU histograms, training
    # curves, the dose-response curves of the shipped calibration, downstream bars
    assert "The gate against downstream harm" in text
    assert seen["expected"] == 8 == len(seen["images"])
    for img in seen["images"]:
        assert img["w"] > 50 and img["h"] > 50 and img["range"] > 50


def test_a_cohort_failing_the_utility_rule_is_said_not_to_be_used(tmp_path, volumes):
    from synthct.eval.utility import utility_verdict

    summary = {
        "balanced_accuracy": {"mean": 0.8, "sd": 0.0},
        "macro_auc": {"mean": 0.9, "sd": 0.0},
        "worst_site_balanced_accuracy": {"mean": 0.7, "sd": 0.0},
        "per_site_balanced_accuracy": {"a": {"mean": 0.8, "sd": 0.0}},
    }
    stopping = {"all": {"holdout_balanced_accuracy": 0.9, "holdout_loss": 0.3}}
    worse = {"all": {"holdout_balanced_accuracy": 0.7, "holdout_loss": 0.6}}

    def headline(with_cohort: list) -> str:
        """The report's opening (before the first section) with this utility verdict."""
        downstream = {
            "rare": [],
            "arms": {"real": {"summary": summary}, "real+synthetic": {"summary": summary}},
            "utility": utility_verdict(
                [(0, stopping)], with_cohort, loss_band=0.03, balanced_accuracy_band=0.03
            ),
        }
        report = write_report(
            tmp_path / "report.html",
            title="t",
            summary={},
            synthetic={"a": volumes[:1]},
            real=None,
            rounds=[],
            gate=None,
            downstream=downstream,
            provenance={},
        )
        return report.read_text().split("<h2", 1)[0]

    head = headline([(0, worse)])
    assert 'Utility rule: <span class="fail">FAIL</span>' in head
    assert "real-only classifier is the result" in head and "+0.300" in head
    # unpaired seeds: nothing to judge, and the report says so
    assert "Utility rule: not judged (not computable" in headline([(1, worse)])


def test_the_report_says_what_protected_the_sites():
    from synthct.report import federation_html

    plain = [{"phase": "autoencoder", "round": 1, "sites": [{"site": "a"}]}]
    assert "No differential privacy" in federation_html(plain)
    assert "SecAgg+" not in federation_html(plain)
    dp = {"epsilon": 3.21, "delta": 1e-3, "releases": 2, "noise_multiplier": 1.0}
    secure = [
        {**plain[0], "secure_aggregation": {"clip_norm": 3.0}, "dp": {**dp, "releases": 1}},
        {"phase": "scale", "round": 0},  # no sites: not a training round
        {**plain[0], "round": 2, "secure_aggregation": {}, "dp": {**dp, "clipping_norm": 0.5}},
    ]
    secure[0]["dp"]["clipping_norm"] = 0.5
    text = federation_html(secure)
    assert "SecAgg+" in text and "epsilon 3.21 at delta 0.001" in text and "2 noised" in text


def test_the_report_shows_who_signed_the_verdict_the_changed_rules_and_the_privacy_account():
    from synthct.privacy import run_account
    from synthct.report import _verdict_provenance_html, privacy_html

    unsigned = _verdict_provenance_html({"rules_changed": {}})
    assert "Not signed" in unsigned
    signed = {
        "signature": {"key_sha256": "ab" * 32},
        "rules_changed": {
            "mode_collapse": {
                "threshold": 0.2,
                "enabled": True,
                "default_threshold": 0.1,
                "default_enabled": True,
            }
        },
    }
    text = _verdict_provenance_html(signed)
    assert "Signed (Ed25519, key sha256 abababab" in text
    assert "Rule mode_collapse changed from the default: threshold 0.1 -&gt; 0.2" in text
    account = run_account(
        {
            "generator": {
                "epsilon": 3.0,
                "delta": 1e-3,
                "releases": 8,
                "bounds_every_update": True,
            },
            "downstream": None,
        }
    )
    shown = privacy_html(account)
    assert "generator: epsilon 3 at delta 0.001 per site (8 noised releases)" in shown
    assert "the run: no privacy bound per site (downstream released without noise)" in shown
