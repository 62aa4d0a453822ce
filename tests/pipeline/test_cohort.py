"""The cohort stage: what the sites lack, planned from their manifest and sampled."""

from __future__ import annotations

from collections import Counter

from synthct.cohort import reference_counts
from synthct.data.manifest import read_manifest
from synthct.pipeline.cohort import make_cohort


def test_each_site_gets_the_classes_it_lacks_and_nothing_when_none(
    tmp_path, smoke_config, smoke_sites, smoke_generator
):
    out = tmp_path / "cohort"
    cohort = make_cohort(
        smoke_generator, smoke_sites, out, per_site=True, steps=2, batch_size=8, seed=1
    )
    rows = read_manifest(cohort.manifest)
    assert cohort.manifest == out / "manifest.csv"
    assert [(r.site, r.label) for r in rows] == [(c.site, c.label) for c in cohort.plan]
    real = reference_counts(smoke_sites, smoke_config)
    made = Counter((r.site, r.label) for r in rows)
    for site, counts in real.items():  # every class filled up to the site's largest one
        top = max(counts[c] for c in smoke_config.labels.classes)
        for label in smoke_config.labels.classes:
            assert counts[label] + made[(site, label)] == top, (site, label)
    assert made[("site_b", "consolidation")] > 0  # the site without the rare class gets it

    nothing = make_cohort(smoke_generator, smoke_sites, tmp_path / "none", target={})
    assert nothing.manifest is None and nothing.plan == []
    assert not (tmp_path / "none").exists()
