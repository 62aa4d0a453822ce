"""Reference classifier/encoder: save/load round trip, vocabulary check, metric helper."""

from __future__ import annotations

import pytest
import torch

from synthct.checkpoint import CheckpointError
from synthct.data.dataset import load_cases
from synthct.reference import (
    evaluate_classifier,
    load_reference,
    save_reference,
    train_reference,
)


def test_train_save_load(tmp_path, smoke_config, smoke_sites):
    train = load_cases(smoke_sites, smoke_config, splits=("train",))
    model = train_reference(
        train,
        classes=smoke_config.labels.classes,
        vocabulary_hash=smoke_config.labels.vocabulary_hash,
        epochs=2,
        seed=0,
        holdout=load_cases(smoke_sites, smoke_config, splits=("holdout",)),
    )
    assert "holdout" in model.info
    save_reference(model, tmp_path / "ref")
    loaded = load_reference(tmp_path / "ref", vocabulary_hash=smoke_config.labels.vocabulary_hash)
    assert torch.allclose(model.predict(train.images), loaded.predict(train.images))
    feats = loaded.features(train.images)
    assert feats.shape == (len(train), 128) and feats.std(0).mean() > 0  # not collapsed
    with pytest.raises(CheckpointError, match="does not match"):
        load_reference(tmp_path / "ref", vocabulary_hash="0" * 16)


def test_evaluate_classifier_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = torch.tensor([0, 1, 1, 1])
    m = evaluate_classifier(probs, labels, 2)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["per_class_recall"] == {0: 1.0, 1: pytest.approx(2 / 3)}
    assert m["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)


def test_blur_augmentation_matches_scipy():
    from scipy.ndimage import gaussian_filter

    from synthct.reference import _gaussian_blur

    x = torch.randn(2, 1, 12, 10, 8, generator=torch.Generator().manual_seed(0))
    ours = _gaussian_blur(x, 0.8)
    theirs = gaussian_filter(x.numpy(), sigma=(0, 0, 0.8, 0.8, 0.8), mode="nearest", truncate=3.0)
    assert torch.allclose(ours, torch.from_numpy(theirs), atol=1e-5)
