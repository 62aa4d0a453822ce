"""Aggregation details of one generator training round (plain and secure)."""

from __future__ import annotations

import pytest
import torch

from synthct.fed.rounds import take_owned_rows


@pytest.mark.parametrize(
    "table",
    ["site_style.feature_bias.weight", "down_blocks.0.resnets.0.norm1.site_bias"],
)
def test_each_per_site_row_comes_from_its_own_site_and_shared_rows_keep_the_average(table):
    start = torch.zeros(4, 3)  # rows: site_a, site_b, null, spare
    sent = []
    for i in range(2):  # each site moved its own row by 1 and the null row by 0.5
        t = start.clone()
        t[i] += 1.0
        t[2] += 0.5
        sent.append((i, {table: t, "decoder.w": torch.full((2,), i * 1.0)}))
    averaged = {
        table: sum(s[table] for _, s in sent) / 2,
        "decoder.w": torch.tensor([0.5, 0.5]),
    }
    take_owned_rows(averaged, sent)
    rows = averaged[table]
    assert torch.equal(rows[0], torch.ones(3)) and torch.equal(rows[1], torch.ones(3))
    assert torch.equal(rows[2], torch.full((3,), 0.5)) and torch.equal(rows[3], torch.zeros(3))
    assert torch.equal(averaged["decoder.w"], torch.tensor([0.5, 0.5]))  # shared weights: FedAvg


def test_the_privacy_record_names_what_its_epsilon_does_not_cover(smoke_config):
    from synthct.fed.rounds import privacy_record

    doc = smoke_config.model_dump()
    doc["federated"]["privacy"] = {"enabled": True, "phases": ["diffusion"]}
    config = type(smoke_config).model_validate(doc)
    assert privacy_record(config, None)["epsilon"] is None  # nothing released yet
    record = privacy_record(config, {"epsilon": 2.5, "releases": 4})
    assert (
        record["epsilon"] == 2.5 and record["releases"] == 4 and record["phases"] == ["diffusion"]
    )
    assert record["not_covered"][:2] == ["autoencoder updates", "decoder updates"]
    assert record["bounds_every_update"] is False  # the autoencoder's updates left in the clear
    doc["federated"]["privacy"]["phases"] = ["autoencoder", "decoder", "diffusion"]
    every = type(smoke_config).model_validate(doc)
    assert privacy_record(every, {"epsilon": 2.5, "releases": 4})["bounds_every_update"]
    continued = privacy_record(every, {"epsilon": 2.5, "releases": 4}, initial="g0")
    assert not continued["bounds_every_update"]
    assert (
        "the generator it continued (g0), trained outside this account"
        in (continued["not_covered"])
    )


def test_per_site_rows_come_back_out_of_the_secure_mean():
    """Under SecAgg+ the server only has the weighted mean; site i alone moved row i, so the
    mean's row i is q_i / sum(q) of its update, and scaling by sum(q) / q_i recovers it."""
    from synthct.fed.rounds import owned_rows_from_secure_mean
    from synthct.fed.secagg import SecAggSettings, SecureRound, site_weight_factor

    settings = SecAggSettings(clip_norm=1.0, max_weight=64, min_replies=2)
    cases = {0: 10, 1: 30}
    own = {0: torch.tensor([1.0, 2.0]), 1: torch.tensor([-3.0, 0.5])}
    q = {i: site_weight_factor(n, settings) for i, n in cases.items()}
    rows = torch.zeros(3, 2)  # site_a, site_b, null
    for i in own:
        rows[i] = own[i] * q[i] / sum(q.values())
    mean = {"class_embedding.sites.weight": rows, "shared.w": torch.tensor([0.25])}
    result = SecureRound(
        mean_update=mean,
        sites=[{"site-index": i, "num-examples": n} for i, n in cases.items()],
    )
    owned_rows_from_secure_mean(mean, result, settings)
    for i in own:
        assert torch.allclose(mean["class_embedding.sites.weight"][i], own[i])
    assert torch.equal(mean["class_embedding.sites.weight"][2], torch.zeros(2))
    assert torch.equal(mean["shared.w"], torch.tensor([0.25]))  # shared weights: the mean
