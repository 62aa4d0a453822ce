"""A site's local work: only its own files, deterministic seeds, honest audit records."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from synthct.fed.task import (
    LocalRun,
    OptimizerStateStore,
    ProcessCache,
    SiteError,
    build_phase_model,
    load_site_cases,
    payload_digest,
    round_seed,
    tensors_from_bytes,
    tensors_to_bytes,
    train_autoencoder_round,
    write_audit,
)
from synthct.models.latent_norm import latent_moments, pooled_latent_norm


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


def test_local_round_is_deterministic_and_moves_weights(smoke_config, smoke_sites):
    cases = load_site_cases(smoke_config, smoke_sites, "site_c")
    start = build_phase_model(smoke_config, "autoencoder").state_dict()
    a = train_autoencoder_round(smoke_config, start, cases, LocalRun(steps=2, seed=7))
    b = train_autoencoder_round(smoke_config, start, cases, LocalRun(steps=2, seed=7))
    assert a.cases == len(cases) and a.steps == 2 and a.loss > 0
    for k in start:
        assert torch.equal(a.state[k], b.state[k])
    assert any(not torch.equal(a.state[k], start[k]) for k in start)


def test_fedprox_term_pulls_towards_the_global_weights(smoke_config, smoke_sites):
    cases = load_site_cases(smoke_config, smoke_sites, "site_a")
    start = build_phase_model(smoke_config, "autoencoder").state_dict()

    def drift(mu: float) -> float:
        out = train_autoencoder_round(
            smoke_config, start, cases, LocalRun(steps=3, seed=1, proximal_mu=mu)
        )
        return sum(float((out.state[k] - start[k]).pow(2).sum()) for k in start)

    assert drift(1e4) < drift(0.0)


def test_payload_bytes_round_trip_and_tamper():
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    data = tensors_to_bytes(tensors)
    from synthct.artifacts import sha256_bytes

    back = tensors_from_bytes(data, sha256=sha256_bytes(data), what="x")
    assert torch.equal(back["w"], tensors["w"])
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(SiteError, match="sha256"):
        tensors_from_bytes(tampered, sha256=sha256_bytes(data), what="frozen autoencoder")


def test_audit_record_matches_payload(tmp_path):
    tensors = {"w": torch.randn(3, 3), "b": torch.zeros(3)}
    rec = write_audit(
        tmp_path,
        site="site_a",
        phase="autoencoder",
        server_round=3,
        tensors=tensors,
        metrics={"num-examples": 9},
        keep_payload=True,
    )
    size, digest = payload_digest(tensors)
    assert rec["bytes"] == size == 4 * 12 and rec["sha256"] == digest
    line = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert line["round"] == 3 and line["tensors"] == 2
    from safetensors.torch import load_file

    kept = load_file(tmp_path / line["payload_file"])
    assert payload_digest(kept)[1] == digest


def test_latent_moments_pool_exactly_globally_and_per_channel():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(5, 2, 4, 4, 4, generator=g) * s + m for s, m in ((1, 0), (2, 1), (3, -1))]
    parts = [p * torch.tensor([1.0, 10.0]).view(1, 2, 1, 1, 1) for p in parts]  # uneven channels
    moments = [latent_moments(p) for p in parts]
    pooled = torch.cat(parts).double()
    one = pooled_latent_norm(moments, "global")
    assert one.shift == (0.0,) and one.scale[0] == pytest.approx(1.0 / float(pooled.std()))
    each = pooled_latent_norm(moments, "per_channel")
    channels = pooled.transpose(0, 1).reshape(2, -1)
    assert each.shift == pytest.approx(channels.mean(1).tolist(), rel=1e-9)
    assert each.scale == pytest.approx((1.0 / channels.std(1)).tolist(), rel=1e-9)
    normalised = each.apply(pooled).transpose(0, 1).reshape(2, -1)
    assert normalised.mean(1).abs().max() < 1e-9 and (normalised.std(1) - 1).abs().max() < 1e-9
    assert torch.allclose(each.undo(each.apply(pooled)), pooled)
    with pytest.raises(ValueError, match="fewer than two"):
        pooled_latent_norm([{"count": [1.0], "sum": [0.0], "sumsq": [0.0]}], "global")


def test_site_optimizer_state_carries_over_rounds(tmp_path, smoke_config, smoke_sites):
    """Round r resumes the AdamW moments of the newest earlier round; only two files are kept;
    a torn file means a fresh optimiser, not a crash."""
    cases = load_site_cases(smoke_config, smoke_sites, "site_a")
    start = build_phase_model(smoke_config, "autoencoder").state_dict()
    store = OptimizerStateStore(tmp_path / "opt", "autoencoder")

    def round_(r: int, state=start):
        return train_autoencoder_round(
            smoke_config, state, cases, LocalRun(steps=2, seed=r, optimizer_state=(store, r))
        )

    r1 = round_(1)
    assert sorted(p.name for p in store.root.iterdir()) == ["autoencoder-round0001.safetensors"]
    fresh = train_autoencoder_round(smoke_config, r1.state, cases, LocalRun(steps=2, seed=2))
    carried = round_(2, r1.state)
    assert any(not torch.equal(fresh.state[k], carried.state[k]) for k in start)
    again = round_(2, r1.state)  # a resumed round 2 loads round 1's moments again
    assert all(torch.equal(again.state[k], carried.state[k]) for k in start)
    round_(3, carried.state)
    names = sorted(p.name for p in store.root.iterdir())
    assert names == ["autoencoder-round0002.safetensors", "autoencoder-round0003.safetensors"]
    (store.root / names[-1]).write_bytes(b"torn")
    probe = torch.optim.AdamW(build_phase_model(smoke_config, "autoencoder").parameters())
    assert store.load_into(probe, 4) is None and not probe.state_dict()["state"]
    assert store.load_into(probe, 3) == 2 and probe.state_dict()["state"]


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
