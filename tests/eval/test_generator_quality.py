"""Generator quality numbers: guidance override, HU distance and within-class diversity."""

from __future__ import annotations

import pytest
import torch

from synthct.data.dataset import load_cases
from synthct.eval.diversity import pairwise_msssim
from synthct.eval.generator_quality import conditional_report, generator_report
from synthct.pretrained import load_phantom_generator, phantom_dir
from synthct.reference import load_reference


@pytest.fixture(scope="module")
def shipped():
    gen = load_phantom_generator()
    reference = load_reference(
        phantom_dir() / "reference", vocabulary_hash=gen.config.labels.vocabulary_hash
    )
    return gen, reference


def test_report_at_a_chosen_guidance(shipped, demo_sites, demo_config):
    gen, reference = shipped
    holdout = load_cases(demo_sites, demo_config, splits=("holdout",))
    report = generator_report(gen, reference, holdout, per_class=2, guidance=9.0)
    classes = demo_config.labels.classes
    assert report["sampling"]["guidance"] == 9.0 != gen.config.sampling.guidance
    assert report["sampling"]["volumes"] == 2 * len(classes)
    assert set(report["ae_ceiling_per_class"]) == set(classes)
    assert set(report["conditional_accuracy_per_class"]) == set(classes)
    for c, name in enumerate(classes):
        pair = report["pairwise_msssim_per_class"][name]
        assert 0.0 < pair["synthetic"] <= 1.0
        assert pair["real"] == pytest.approx(pairwise_msssim(holdout.images[holdout.labels == c]))
        assert report["hu_histogram_l1_per_class"][name] >= 0.0


def test_guidance_defaults_to_the_config_and_changes_the_samples(shipped, demo_sites, demo_config):
    gen, reference = shipped
    holdout = load_cases(demo_sites, demo_config, splits=("holdout",))
    default = conditional_report(gen, reference, holdout, per_class=1)
    unguided = conditional_report(gen, reference, holdout, per_class=1, guidance=0.0)
    assert default["sampling"]["guidance"] == gen.config.sampling.guidance
    assert unguided["sampling"]["guidance"] == 0.0
    # same seed, different guidance: different volumes, so a different HU histogram
    assert default["hu_histogram_l1_per_class"] != unguided["hu_histogram_l1_per_class"]
    assert torch.isfinite(torch.tensor(list(default["hu_histogram_l1_per_class"].values()))).all()
