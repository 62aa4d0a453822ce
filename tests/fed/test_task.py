"""A site's local training round: deterministic, FedProx, optimiser state kept between rounds."""

from __future__ import annotations

import pytest
import torch

from synthct.fed.site_state import OptimizerStateStore, load_site_cases
from synthct.fed.task import LocalRun, build_phase_model, train_autoencoder_round
from synthct.models.latent_norm import latent_moments, pooled_latent_norm


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


def test_optimizer_state_for_another_parameter_order_starts_fresh(tmp_path):
    """Moments saved for another parameter order (or model) would land on the wrong tensors:
    the site starts fresh instead."""
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    store = OptimizerStateStore(tmp_path / "opt", "diffusion")
    first = torch.optim.AdamW([a, b])
    a.grad, b.grad = torch.ones(3), torch.ones(2, 2)
    first.step()
    store.save(first, 1)
    same = torch.optim.AdamW([a, b])
    assert store.load_into(same, 2) == 1 and same.state_dict()["state"]
    swapped = torch.optim.AdamW([{"params": [b]}, {"params": [a], "weight_decay": 0.0}])
    assert store.load_into(swapped, 2) is None and not swapped.state_dict()["state"]
