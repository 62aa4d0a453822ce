"""Downstream classifiers: the gate is enforced; central and federated arms report per site.

Real data: the demo phantom sites; the cohort: fresh real phantoms (another seed) gated for
real with the shipped reference models, so the passing gate is earned, not written by hand.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from synthct.artifacts import read_json
from synthct.cli import main
from synthct.downstream import (
    EarlyStopping,
    build_classifier,
    class_counts,
    holdout_score,
    predict,
    run_downstream,
    score_from_counts,
    train_converged,
)
from synthct.eval import negatives
from synthct.eval.gate import GateError, load_real, run_gate, write_gate
from synthct.pretrained import load_phantom_reference

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(demo_config):
    """The demo data with a tiny, quick downstream schedule."""
    down = demo_config.downstream.model_copy(
        update={"channels": [4, 8], "strides": [2, 2], "epochs": 1, "rounds": 1, "seeds": [0]}
    )
    fed = demo_config.federated.model_copy(update={"round_timeout_s": 300})
    return demo_config.model_copy(update={"downstream": down, "federated": fed})


@pytest.fixture(scope="module")
def gated(tmp_path_factory, demo_config, demo_sites):
    """A passing cohort (fresh real phantoms) and a failing one (labels rotated)."""
    root = tmp_path_factory.mktemp("cohorts")
    reference = load_phantom_reference(demo_config.labels.vocabulary_hash)
    real = load_real(demo_sites, demo_sites, config=demo_config, reference=reference)
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
    args = ["downstream", "--config", str(config), "--real", str(demo_sites)]
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


def test_early_stopping_keeps_the_best_and_stops_after_patience():
    stopper = EarlyStopping(2)
    scores = [(0.5, -1.0), (0.7, -0.9), (0.7, -0.95), (0.6, -0.92), (0.9, -0.1)]
    for i, score in enumerate(scores[:4]):
        stopper.update(score, {"w": torch.tensor([float(i)])})
    assert stopper.stop and stopper.best_at == 2  # ties on accuracy go to the lower loss
    assert stopper.best_state["w"].item() == 1.0
    never = EarlyStopping(0)
    for i, score in enumerate(scores):
        never.update(score, {"w": torch.tensor([float(i)])})
    assert not never.stop and never.best_at == 5
    # a plateau in balanced accuracy while the loss still falls is not a reason to stop
    learning = EarlyStopping(2)
    for i in range(6):
        learning.update((0.25, -1.4 + 0.05 * i), {"w": torch.tensor([float(i)])})
    assert not learning.stop and learning.best_at == 6


def test_pooled_site_counts_score_like_the_central_holdout(tiny, demo_sites):
    """The federated stopping rule (per-site counts, pooled) equals the central one."""
    from synthct.data.dataset import load_cases

    holdout = load_cases(demo_sites, tiny, splits=("holdout",))
    model = build_classifier(tiny)
    k = tiny.labels.num_classes
    central = holdout_score(model, holdout, k)
    parts = [
        class_counts(predict(model, holdout.images[i::2]), holdout.labels[i::2].numpy(), k)
        for i in range(2)
    ]
    pooled = score_from_counts(*(parts[0][i] + parts[1][i] for i in range(3)))
    assert pooled == pytest.approx(central)


def test_converged_training_stops_on_holdout(tiny, demo_sites):
    from synthct.data.dataset import load_cases

    config = tiny.model_copy(
        update={"downstream": tiny.downstream.model_copy(update={"epochs": 40, "patience": 3})}
    )
    train = load_cases(demo_sites, config, splits=("train",), sites=("site_a",))
    holdout = load_cases(demo_sites, config, splits=("holdout",), sites=("site_a",))
    model = build_classifier(config)
    info = train_converged(model, train, holdout, config, seed=0)
    # it stopped at least `patience` epochs after its best one, or ran the whole budget
    assert info["epochs_run"] - info["best_at"] >= 3 or info["epochs_run"] == 40
    # the model is left at its best epoch: scoring it again gives the recorded best
    bal, neg_loss = holdout_score(model, holdout, config.labels.num_classes)
    assert bal == pytest.approx(info["holdout_balanced_accuracy"])
    assert -neg_loss == pytest.approx(info["holdout_loss"], rel=1e-5)
