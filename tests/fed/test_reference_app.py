"""The federated reference classifier/encoder (Flower simulation, FedAvg): each site trains on
its own rows and sends weights and holdout confusion counts only; the result is a reference
model the gate loads like a central one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from synthct.cli import main
from synthct.config import load_config, packaged_config_path
from synthct.data.dataset import load_cases
from synthct.fed.reference_app import holdout_from_confusion, round_lr, small_classes
from synthct.reference import evaluate_classifier, load_reference

pytestmark = pytest.mark.slow


def test_learning_rate_warms_up_then_anneals():
    lrs = [round_lr(r, 8, base=1e-3) for r in range(1, 9)]
    assert lrs[0] < lrs[1] == pytest.approx(1e-3)  # warm-up: the first quarter of the rounds
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:], strict=False))
    assert lrs[-1] == pytest.approx(5e-5)


def test_holdout_block_from_confusion_counts():
    confusion = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    block = holdout_from_confusion(confusion, ["a", "b", "c"])
    assert block["cases"] == 6 and block["accuracy"] == pytest.approx(5 / 6)
    assert block["per_class_recall"] == {"a": 0.75, "b": 1.0}  # absent class omitted
    assert block["balanced_accuracy"] == pytest.approx(0.875)


def test_cli_trains_a_federated_reference_the_gate_can_use(smoke_sites, smoke_config, tmp_path):
    config_path = str(packaged_config_path("smoke"))
    out = tmp_path / "reference"
    args = ["reference", "--data", str(smoke_sites), "--config", config_path]
    small = "federated.min_class_cases=3"  # the smoke sites hold 2-4 cases per class
    assert main([*args, "--set", small, "--out", str(out), "--federated"]) == 0
    smoke_config = load_config(config_path, [small])
    model = load_reference(out, vocabulary_hash=smoke_config.labels.vocabulary_hash)
    info = model.info
    assert info["trained"] == "federated" and info["rounds"] == 3
    assert len(info["loss_per_round"]) == 3
    # the confusion counts the sites sent add up to the pooled holdout of the classes each
    # site holds enough cases of (the smoke sites hold 3-5 per class; a class under
    # federated.min_class_cases is sent as zeros and named), and the saved model's own
    # predictions on those cases reproduce them
    holdout = load_cases(smoke_sites, smoke_config, splits=("holdout",))
    withheld = {
        site: small_classes(smoke_sites, smoke_config, site) for site in smoke_config.site_names
    }
    kept = [
        i
        for i, (site, label) in enumerate(zip(holdout.sites, holdout.labels.tolist(), strict=True))
        if not withheld[site][label]
    ]
    assert 0 < len(kept) < len(holdout) and info["holdout"]["cases"] == len(kept)
    classes = smoke_config.labels.classes
    assert info["holdout"]["not_evaluated"] == {
        site: [classes[c] for c in flags.nonzero().flatten().tolist()]
        for site, flags in withheld.items()
        if flags.any()
    }
    kept_cases = holdout.subset(torch.tensor(kept))
    again = evaluate_classifier(
        model.predict(kept_cases.images), kept_cases.labels, smoke_config.labels.num_classes
    )
    assert info["holdout"]["accuracy"] == pytest.approx(again["accuracy"])
    # each site logged its weights every round and one confusion matrix, nothing else
    for site in smoke_config.site_names:
        audit = out / "federated" / "sites" / site / "audit.jsonl"
        phases = [json.loads(line)["phase"] for line in audit.read_text().splitlines()]
        assert phases == ["reference"] * 3 + ["reference-holdout"]


def test_cli_reference_refuses_a_missing_manifest(tmp_path, capsys):
    missing = tmp_path / "nope.csv"
    assert main(["reference", "--data", str(missing), "--out", str(tmp_path / "r")]) == 2
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing half-written


def test_a_reference_trained_under_secagg_matches_plain_fedavg(smoke_sites, smoke_config, tmp_path):
    """The same federated reference run, plain and under SecAgg+: the sites train alike from
    the same global weights, so the secure means differ from FedAvg's only by quantisation,
    and the trained networks agree to that precision; the classifier's predictions match."""
    import torch

    from synthct.fed.reference_app import train_reference_federated

    doc = smoke_config.model_dump()
    doc["federated"]["reference_rounds"] = 1
    plain_config = type(smoke_config).model_validate(doc)
    doc["federated"]["secagg"] = {
        "enabled": True,
        "clip_norm": {"reference": 20.0},
        "max_weight": 64,
    }
    secure_config = type(smoke_config).model_validate(doc)
    plain = train_reference_federated(plain_config, smoke_sites, tmp_path / "plain")
    secure = train_reference_federated(secure_config, smoke_sites, tmp_path / "secure")
    a, b = plain.net.state_dict(), secure.net.state_dict()
    for key, value in a.items():
        if value.is_floating_point():
            assert torch.allclose(value, b[key], atol=1e-3), key
    assert not all(torch.equal(a[k], b[k]) for k in a)  # it did go through quantisation
    holdout = load_cases(smoke_sites, smoke_config, splits=("holdout",))
    assert np.array_equal(
        plain.predict(holdout.images).argmax(1), secure.predict(holdout.images).argmax(1)
    )


def test_a_reference_under_dp_and_secagg_records_its_privacy(smoke_sites, smoke_config, tmp_path):
    """DP on the reference's phase: every round's secure mean (equal weights, the sites
    clipped to the DP bound) is noised and accounted; the model records its epsilon."""
    from synthct.fed.reference_app import train_reference_federated

    doc = smoke_config.model_dump()
    doc["federated"]["reference_rounds"] = 2
    doc["federated"]["privacy"] = {"enabled": True, "phases": ["reference"], "clipping_norm": 5.0}
    doc["federated"]["secagg"] = {"enabled": True, "max_weight": 64}
    model = train_reference_federated(
        type(smoke_config).model_validate(doc), smoke_sites, tmp_path / "dp"
    )
    privacy = model.info["privacy"]
    assert privacy["releases"] == 2 and privacy["epsilon"] > 0 and privacy["phase"] == "reference"
    assert "holdout confusion" in privacy["not_covered"][0]
