"""What a site process keeps: only its own cases, stable round seeds, a cache of several sites."""

from __future__ import annotations

import csv

import pytest

from synthct.fed.errors import SiteError
from synthct.fed.site_state import ProcessCache, load_site_cases, round_seed


def _manifest_with_foreign_rows_broken(src, dst, keep_site: str) -> None:
    """Copy a manifest; every other site's path points at a file that cannot be read."""
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    base = src.parent
    dst.parent.mkdir(parents=True, exist_ok=True)
    poison = dst.parent / "not_yours.nii.gz"
    poison.write_bytes(b"this is another hospital's file")
    with open(dst, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            if row["site"] == keep_site:
                row["path"] = str((base / row["path"]).resolve())
            else:
                row["path"] = str(poison)
            writer.writerow(row)


def test_site_reads_only_its_own_rows(tmp_path, smoke_config, smoke_sites):
    manifest = tmp_path / "site_a" / "manifest.csv"
    _manifest_with_foreign_rows_broken(smoke_sites, manifest, "site_a")
    cases = load_site_cases(smoke_config, manifest, "site_a")
    assert set(cases.sites) == {"site_a"}
    assert len(cases) > 0
    # the same manifest read as site_b must open the poisoned files and fail, naming them
    with pytest.raises(Exception, match="not_yours"):
        load_site_cases(smoke_config, manifest, "site_b")


def test_unknown_site_and_missing_manifest_are_named(tmp_path, smoke_config, smoke_sites):
    with pytest.raises(SiteError, match="site_z"):
        load_site_cases(smoke_config, smoke_sites, "site_z")
    with pytest.raises(SiteError, match="nowhere.csv"):
        load_site_cases(smoke_config, tmp_path / "nowhere.csv", "site_a")


def test_round_seed_is_stable_and_distinct():
    assert round_seed(0, "autoencoder", 1, "site_a") == round_seed(0, "autoencoder", 1, "site_a")
    seeds = {round_seed(0, p, r, s) for p in ("a", "d") for r in (1, 2) for s in ("x", "y")}
    assert len(seeds) == 8


def test_a_site_process_keeps_several_sites_entries():
    """Two simulation actors serve four sites in turn: each keeps every site it served."""
    made: list[str] = []
    cache = ProcessCache(size=3)

    def make(site: str):
        return lambda: made.append(site) or f"cases of {site}"

    for site in ["site_a", "site_b", "site_a", "site_c", "site_b", "site_a"]:
        assert cache.get(site, make(site)) == f"cases of {site}"
    assert made == ["site_a", "site_b", "site_c"]  # each read once
    cache.get("site_d", make("site_d"))  # a fourth entry: the least recently used goes
    cache.get("site_c", make("site_c"))
    assert made == ["site_a", "site_b", "site_c", "site_d", "site_c"]
