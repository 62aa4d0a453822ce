"""A deployed site trains only on its own copy of the cohort the gate judged."""

from __future__ import annotations

import shutil

import pytest
from flwr.app import ConfigRecord, Context, RecordDict

from synthct.eval.negatives import fresh_real_cohort
from synthct.fed.downstream_app import _site_cohort, cohort_digest
from synthct.fed.errors import SiteError
from synthct.fed.sites import SiteSettings


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_a_site_copy_must_hash_to_the_gated_cohort(tmp_path, smoke_config):
    gated = fresh_real_cohort(smoke_config, {"nodule": 2}, tmp_path / "gated", seed=1)
    copy = shutil.copytree(gated.parent, tmp_path / "site_a" / "cohort") / "manifest.csv"
    site = SiteSettings("site_a", 0, tmp_path / "m.csv", tmp_path / "audit")
    cfg = ConfigRecord({"cohort-digest": cohort_digest(gated), "cohort-manifest": ""})
    assert _site_cohort(cfg, _context({"cohort": str(copy)}), site) == copy
    with pytest.raises(SiteError, match="node config names none"):
        _site_cohort(cfg, _context({}), site)
    volume = next((copy.parent / "cases").rglob("*.nii.gz"))
    volume.write_bytes(volume.read_bytes()[:-10])  # one file of the copy altered
    with pytest.raises(SiteError, match="not the cohort the gate judged"):
        _site_cohort(cfg, _context({"cohort": str(copy)}), site)
    # in Flower's simulation the server's own cohort is read (no digest sent)
    sim = ConfigRecord({"cohort-digest": "", "cohort-manifest": str(gated)})
    assert _site_cohort(sim, _context({}), site) == gated
