"""The federated gate (Flower simulation, 4 sites, each reading only its own rows) reaches the
central gate's verdicts, on a fresh real cohort and on the hard negatives whose rules rest on
what sites send per case or per scanner (copies, one site's cases, shuffled site labels): every
exact rule fails exactly where it fails centrally, and each negative fails its own rule in both
modes. The other negatives are judged in both modes in-process by tests/eval/test_metrics.py."""

from __future__ import annotations

import json

import pytest

from synthct.cli import main
from synthct.eval import negatives
from synthct.eval.gate import DEFAULT_RULES, run_gate
from synthct.eval.metrics import EXACT_ACROSS_SITES as EXACT
from synthct.fed.gate_app import run_gate_federated

pytestmark = pytest.mark.slow

COUNTS = {"nodule": 20, "ground_glass": 20, "consolidation": 30}


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory, demo_config, demo_reference, demo_real):
    out = tmp_path_factory.mktemp("cohorts")
    fresh = negatives.fresh_real_cohort(demo_config, COUNTS, out / "fresh", seed=4242)
    base = negatives.load_cohort_volumes(fresh)
    reference, real = demo_reference, demo_real
    labels = [demo_config.labels.classes[i] for i in real.train.labels.tolist()]
    return (
        {
            "fresh": fresh,
            "near_copies": negatives.near_copies(
                real.train.paths, labels, base, out / "copies", fraction=0.2
            ),
            "site_balance": negatives.fresh_real_cohort(
                demo_config, COUNTS, out / "single", seed=5, sites=["site_d"]
            ),
            "site_style": negatives.sites_shuffled(fresh, out / "shuffled"),
        },
        real,
        reference,
    )


def test_federated_verdicts_agree_with_central(cohorts, demo_config, demo_sites, tmp_path):
    manifests, real, reference = cohorts
    names = list(manifests)
    # every class evaluated at every site (the small-class guard off): exact equality holds
    fed = demo_config.federated.model_copy(update={"min_class_cases": 1})
    reports = run_gate_federated(
        [manifests[n] for n in names],
        demo_sites,
        config=demo_config.model_copy(update={"federated": fed}),
        reference=reference,
        run_dir=tmp_path / "run",
        bootstrap=50,
    )
    for name, fed in zip(names, reports, strict=True):
        central = run_gate(
            manifests[name], real, config=demo_config, reference=reference, bootstrap=50
        )
        assert fed["verdict"] == central["verdict"], (name, fed["failed_rules"])
        if name != "fresh":
            assert name in fed["failed_rules"], (name, fed["failed_rules"])
        exact_rules = {r for r, spec in DEFAULT_RULES.items() if spec.metric in EXACT}
        assert set(fed["failed_rules"]) & exact_rules == set(central["failed_rules"]) & exact_rules
        for metric in EXACT:
            c, f = central["metrics"][metric]["value"], fed["metrics"][metric]["value"]
            if c is None:  # not computable in either mode (site_style of a pooled cohort)
                assert f is None, (name, metric)
                continue
            assert f == pytest.approx(c, rel=1e-5, abs=1e-6), (name, metric)
        assert fed["real"]["mode"] == "federated" and fed["real"]["not_evaluated"] == {}
    copies = reports[names.index("near_copies")]
    assert copies["flags"] and all(
        "a train case at site_" in f["reasons"][0] for f in copies["flags"]
    )
    # each site logged exactly what left it: two rounds per cohort, never an image
    for site in demo_config.site_names:
        audit = tmp_path / "run" / "sites" / site / "audit.jsonl"
        records = [json.loads(line) for line in audit.read_text().splitlines()]
        assert [r["phase"] for r in records] == ["gate-summary", "gate-evidence"] * len(names)


def test_cli_federated_gate(cohorts, demo_sites, tmp_path, capsys):
    """With the default small-class guard (k = 5) site_c and site_d, which hold 3 consolidation
    cases each, send nothing on that class; the gate names them and still passes a fresh cohort."""
    manifests, _, _ = cohorts
    out = tmp_path / "gate.json"
    args = ["gate", "--cohort", str(manifests["fresh"].parent), "--federated"]
    assert main([*args, "--out", str(tmp_path)]) == 2  # no --data: bad input
    assert main([*args, "--data", str(demo_sites), "--out", str(tmp_path)]) == 0
    report = json.loads(out.read_text())
    assert report["verdict"] == "pass"
    assert report["real"]["min_class_cases"] == 5
    assert report["real"]["not_evaluated"] == {
        "site_c": ["consolidation"],
        "site_d": ["consolidation"],
    }
    assert "not evaluated (fewer than 5 cases at the site)" in capsys.readouterr().out
