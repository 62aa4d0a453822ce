"""Graded hard negatives: each degrades the property it names, by the amount asked."""

from __future__ import annotations

import numpy as np

from synthct.data.manifest import read_manifest
from synthct.eval import negatives

CLASSES = ["normal", "nodule", "ground_glass", "consolidation"]


def _base(n_per_class: int = 6):
    rng = np.random.default_rng(0)
    labels = [c for c in CLASSES for _ in range(n_per_class)]
    volumes = [rng.normal(-500, 200, (8, 8, 8)).astype(np.float32) for _ in labels]
    return volumes, labels, [(2.0, 2.0, 2.0)] * len(labels)


def test_partial_relabelling_rotates_that_share_of_the_labels(tmp_path):
    base = _base()
    manifest = negatives.relabelled(base, tmp_path / "r", classes=CLASSES, fraction=0.25)
    after = [r.label for r in read_manifest(manifest)]
    changed = [(a, b) for a, b in zip(base[1], after, strict=True) if a != b]
    assert len(changed) == 6  # a quarter of 24
    assert all(CLASSES[(CLASSES.index(a) + 1) % 4] == b for a, b in changed)
    all_wrong = negatives.relabelled(base, tmp_path / "all", classes=CLASSES)
    assert all(a != r.label for a, r in zip(base[1], read_manifest(all_wrong), strict=True))


def test_mode_collapse_keeps_the_asked_number_of_distinct_volumes_per_class(tmp_path):
    base = _base()
    for distinct in (1, 3):
        manifest = negatives.mode_collapse(base, tmp_path / f"c{distinct}", distinct=distinct)
        vols, labels, _ = negatives.load_cohort_volumes(manifest)
        for c in CLASSES:
            originals = [v for v, lab in zip(base[0], base[1], strict=True) if lab == c]
            for v in (v for v, lab in zip(vols, labels, strict=True) if lab == c):
                nearest = min(np.abs(v - o).mean() for o in originals[:distinct])
                assert nearest < 15  # a noised copy (10 HU) of one of the first `distinct`
        assert labels == base[1]


def test_smoothing_removes_voxel_noise_and_keeps_the_labels(tmp_path):
    base = _base()
    manifest = negatives.smoothed(base, tmp_path / "s", sigma_vox=1.0)
    vols, labels, _ = negatives.load_cohort_volumes(manifest)
    assert labels == base[1]
    before = np.mean([np.abs(np.diff(v, axis=0)).mean() for v in base[0]])
    after = np.mean([np.abs(np.diff(v, axis=0)).mean() for v in vols])
    assert after < 0.3 * before
    assert abs(np.mean(vols) - np.mean(base[0])) < 5  # intensities kept, texture gone
