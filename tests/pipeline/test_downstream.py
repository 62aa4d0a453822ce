"""Downstream classifiers: the gate is enforced; central and federated arms report per site.

Real data: the demo phantom sites; the cohort: fresh real phantoms (another seed) gated for
real with the shipped reference models, so the passing gate is earned, not written by hand.
"""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file

from synthct.artifacts import read_json
from synthct.cli import main
from synthct.eval import negatives
from synthct.eval.gate import GateError, run_gate, write_gate
from synthct.pipeline.downstream import run_downstream

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gated(tmp_path_factory, demo_config, demo_reference, demo_real):
    """A passing cohort (fresh real phantoms) and a failing one (labels rotated)."""
    root = tmp_path_factory.mktemp("cohorts")
    reference, real = demo_reference, demo_real
    counts = {"nodule": 6, "ground_glass": 6, "consolidation": 10}
    good = negatives.fresh_real_cohort(demo_config, counts, root / "good", seed=31).parent
    bad = negatives.relabelled(
        negatives.load_cohort_volumes(good / "manifest.csv"),
        root / "bad",
        classes=demo_config.labels.classes,
    ).parent
    for cohort in (good, bad):
        report = run_gate(cohort / "manifest.csv", real, config=demo_config, reference=reference)
        write_gate(report, cohort / "gate.json")
    assert read_json(good / "gate.json")["verdict"] == "pass"
    assert read_json(bad / "gate.json")["verdict"] == "fail"
    return good, bad


def test_gate_is_enforced(tmp_path, tiny, demo_sites, gated):
    good, bad = gated
    with pytest.raises(GateError, match="failed the gate.*conditioning"):
        run_downstream(tiny, demo_sites, tmp_path / "a", cohort_dir=bad)
    assert not (tmp_path / "a").exists()  # a refused run leaves no empty result folder
    # with trusted keys, only a verdict one of them signed is accepted
    from synthct.signing import SignatureError, make_signing_key

    (key, pub), (other_key, _) = (make_signing_key(tmp_path / "k", n) for n in ("gate", "other"))
    signed = tmp_path / "signed"
    shutil.copytree(good, signed)
    write_gate(read_json(good / "gate.json"), signed / "gate.json", sign_with=other_key)
    with pytest.raises(SignatureError, match="not among the trusted"):
        run_downstream(tiny, demo_sites, tmp_path / "s", cohort_dir=signed, trusted_keys=[pub])
    with pytest.raises(SignatureError, match="not signed"):  # the fixture's verdict is unsigned
        run_downstream(tiny, demo_sites, tmp_path / "u", cohort_dir=good, trusted_keys=[pub])
    write_gate(read_json(good / "gate.json"), signed / "gate.json", sign_with=key)
    accepted = run_downstream(
        tiny, demo_sites, tmp_path / "v", cohort_dir=signed, trusted_keys=[pub]
    )
    assert accepted["gate"]["signed_by"] == str(pub)
    missing = tmp_path / "nogate"
    shutil.copytree(good, missing)
    (missing / "gate.json").unlink()
    with pytest.raises(GateError, match="no gate report"):
        run_downstream(tiny, demo_sites, tmp_path / "b", cohort_dir=missing)
    tampered = tmp_path / "tampered"
    shutil.copytree(good, tampered)
    victim = sorted((tampered / "cases").rglob("*.nii.gz"))[3]
    victim.write_bytes(victim.read_bytes()[:-7])
    with pytest.raises(GateError, match=victim.name):
        run_downstream(tiny, demo_sites, tmp_path / "c", cohort_dir=tampered)
    # --force-ungated runs, and the results say so
    results = run_downstream(tiny, demo_sites, tmp_path / "d", cohort_dir=bad, force_ungated=True)
    assert results["ungated"] is True and "failed the gate" in results["gate"]["refusal"]


def test_central_arms_report_every_site(tmp_path, tiny, demo_sites, gated):
    good, _ = gated
    results = run_downstream(tiny, demo_sites, tmp_path / "run", cohort_dir=good)
    assert results["ungated"] is False and results["gate"]["gated"] is True
    assert set(results["arms"]) == {"real", "real+synthetic"}
    run = results["arms"]["real+synthetic"]["runs"][0]
    assert run["train_cases"]["synthetic"] == 22
    assert set(run["per_site"]) == {"site_a", "site_b", "site_c", "site_d"}
    assert list(run["overall"]["per_class_recall"])[0] == "consolidation"  # rare class first
    # the synthetic arm's effect, paired by seed, with a 95 % bootstrap interval per figure
    effect = results["effect"]
    for key in ("balanced_accuracy", "recall_consolidation", "site_site_b_balanced_accuracy"):
        low, high = effect[key]["ci95"]
        assert low <= effect[key]["mean"] <= high, key
    saved = read_json(tmp_path / "run" / "results.json")
    assert saved["kind"] == "synthct-downstream" and saved["versions"]["torch"]
    # the utility rule pairs the arms' best holdout scores (never test) seed by seed
    utility = saved["utility"]
    assert utility["split"] == "holdout" and utility["passed"] in (True, False)
    before, after = (results["arms"][a]["runs"][0]["stopping"]["all"] for a in results["arms"])
    (pair,) = utility["per_seed"]
    assert pair["loss_change"] == pytest.approx(after["holdout_loss"] - before["holdout_loss"])
    assert utility["passed"] == (
        pair["loss_change"] <= utility["loss_band"]
        and pair["balanced_accuracy_change"] >= -utility["balanced_accuracy_band"]
    )
    # local-only: every site alone, each scored on its own test cases
    local = run_downstream(tiny, demo_sites, tmp_path / "local", local=True)
    run = local["arms"]["real"]["runs"][0]
    assert local["mode"] == "local" and run["overall"]["cases"] == local["test_cases"]
    assert set(run["per_site"]) == {"site_a", "site_b", "site_c", "site_d"}


def test_federated_end_to_end_through_the_cli(tmp_path, demo_sites, gated):
    good, _ = gated
    config = tmp_path / "tiny.yaml"
    from synthct.config import packaged_config_path

    text = packaged_config_path("demo").read_text()
    text += (
        "downstream: {channels: [4, 8], strides: [2, 2], rounds: 2, local_epochs: 1,"
        " keep_optimizer_state: true}\n"
    )
    config.write_text(text)
    out = tmp_path / "fed"
    args = ["downstream", "--config", str(config), "--data", str(demo_sites)]
    assert main([*args, "--cohort", str(good), "--federated", "--out", str(out)]) == 0
    results = read_json(out / "results.json")
    assert results["mode"] == "federated"
    for arm in ("real", "real+synthetic"):
        run = results["arms"][arm]["runs"][0]
        assert set(run["per_site"]) == {"site_a", "site_b", "site_c", "site_d"}
        assert run["overall"]["cases"] == results["test_cases"]
        # every round was scored on the sites' pooled holdout; the best round was kept
        stopping = run["stopping"]["all"]
        assert 1 <= stopping["best_at"] <= stopping["epochs_run"] <= 2
        assert 0.0 <= stopping["holdout_balanced_accuracy"] <= 1.0
    assert results["utility"]["per_seed"][0]["seed"] == 0  # federated arms are paired too
    # each site kept its AdamW moments on its own disk, one series per arm: round 2 went on
    # from round 1's (its step count is twice round 1's), not from fresh moments
    for site in ("site_a", "site_b", "site_c", "site_d"):
        states = sorted((out / "sites" / site / "optimizer").glob("downstream-*.safetensors"))
        arms = {p.name.rsplit("-round", 1)[0] for p in states}
        assert len(arms) == 2 and len(states) == 4, states
        for arm in arms:
            first, second = (
                load_file(out / "sites" / site / "optimizer" / f"{arm}-round{r:04d}.safetensors")
                for r in (1, 2)
            )
            assert float(second["0.step"]) == 2 * float(first["0.step"]) > 0


def test_federated_arms_under_dp_share_one_privacy_account(tmp_path, tiny, demo_sites, gated):
    good, _ = gated
    privacy = tiny.federated.privacy.model_copy(
        update={"enabled": True, "phases": ["downstream"], "noise_multiplier": 0.5}
    )
    down = tiny.downstream.model_copy(update={"rounds": 2})
    config = tiny.model_copy(
        update={
            "federated": tiny.federated.model_copy(update={"privacy": privacy}),
            "downstream": down,
        }
    )
    results = run_downstream(config, demo_sites, tmp_path / "dp", cohort_dir=good, federated=True)
    rounds = sum(
        run["stopping"]["all"]["epochs_run"]
        for arm in results["arms"].values()
        for run in arm["runs"]
    )
    privacy = results["privacy"]
    # every aggregated round of both arms is one noised release in the same account
    assert privacy["releases"] == rounds == 4 and privacy["epsilon"] > 0
    assert privacy["phase"] == "downstream" and len(privacy["not_covered"]) == 2
