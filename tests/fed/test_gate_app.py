"""The federated gate (Flower simulation, 4 sites, each reading only its own rows) reaches the
central gate's verdicts, on a fresh real cohort and on each hard negative: every exact rule
fails exactly where it fails centrally, and each negative fails its own rule in both modes."""

from __future__ import annotations

import json

import pytest

from synthct.cli import main
from synthct.eval import negatives
from synthct.eval.gate import DEFAULT_RULES, load_real, run_gate
from synthct.fed.gate_app import run_gate_federated
from synthct.pretrained import load_phantom_reference

pytestmark = pytest.mark.slow

COUNTS = {"nodule": 20, "ground_glass": 20, "consolidation": 30}
EXACT = (
    "kid_encoder",
    "kid_radiomics",
    "hu_insane_rate",
    "conditioning_gap",
    "proportion_tv",
    "site_style_match",
)


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory, demo_config, demo_sites):
    out = tmp_path_factory.mktemp("cohorts")
    fresh = negatives.fresh_real_cohort(demo_config, COUNTS, out / "fresh", seed=4242)
    base = negatives.load_cohort_volumes(fresh)
    reference = load_phantom_reference(demo_config.labels.vocabulary_hash)
    real = load_real(demo_sites, demo_sites, config=demo_config, reference=reference)
    labels = [demo_config.labels.classes[i] for i in real.train.labels.tolist()]
    return (
        {
            "fresh": fresh,
            "near_copies": negatives.near_copies(
                real.train.paths, labels, base, out / "copies", fraction=0.2
            ),
            "mode_collapse": negatives.mode_collapse(base, out / "collapse"),
            "hu_sanity": negatives.hu_shift(base, out / "shift", offset_hu=60),
            "conditioning": negatives.relabelled(
                base, out / "relabel", classes=demo_config.labels.classes
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
