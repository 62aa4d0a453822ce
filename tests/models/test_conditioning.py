"""Class + site conditioning of the diffusion UNet: indices, embeddings, training, sampling."""

from __future__ import annotations

import pytest
import torch

from synthct.checkpoint import build_generator, load_generator, save_generator
from synthct.cohort import CohortError, PlannedCase, generate_cohort
from synthct.data.manifest import read_manifest
from synthct.models.conditioning import Conditioning, FactorizedEmbedding, UnknownSiteError
from synthct.models.schedulers import sampling_scheduler, training_scheduler
from synthct.sampling import sample_latents
from synthct.training import diffusion_step


def _site_config(config):
    return config.model_copy(
        update={"unet": config.unet.model_copy(update={"site_conditioning": True})}
    )


def test_factorized_embedding_is_the_sum_of_a_class_and_a_site_row():
    emb = FactorizedEmbedding(class_slots=6, site_slots=5, dim=8)
    index = torch.tensor([0, 7, 29])  # (0, 0), (1, 2), (5, 4)
    want = emb.classes(torch.tensor([0, 1, 5])) + emb.sites(torch.tensor([0, 2, 4]))
    assert torch.equal(emb(index), want)


def test_conditioning_indices_and_errors():
    cond = Conditioning(4, ("site_a", "site_b"), site_slots=4)
    sites = cond.site_indices(["site_b", "pooled", None, "site_a"])
    assert sites.tolist() == [1, 2, 2, 0]  # pooled / None = the null site (2)
    assert cond.encode(torch.tensor([3, 4]), torch.tensor([1, 2])).tolist() == [13, 18]
    assert cond.encode(torch.tensor([3])).tolist() == [14]  # no site given = null site
    with pytest.raises(UnknownSiteError, match=r"unknown site 'site_z'.*\['site_a', 'site_b'\]"):
        cond.site_indices(["site_z"])
    assert cond.site_indices(["site_z"], unknown_as_null=True).tolist() == [2]
    class_only = Conditioning(4)
    assert class_only.site_indices(["site_a"]) is None
    assert class_only.encode(torch.tensor([1, 4])).tolist() == [1, 4]


def test_site_conditioned_generator_round_trips(smoke_config, tmp_path):
    config = _site_config(smoke_config)
    gen = build_generator(config, seed=0)
    assert isinstance(gen.unet.class_embedding, FactorizedEmbedding)
    assert gen.conditioning.sites == tuple(config.site_names)
    save_generator(gen, tmp_path / "g")
    loaded = load_generator(tmp_path / "g")
    z = torch.randn(2, *config.latent_shape)
    c = gen.conditioning.encode(torch.tensor([1, 2]), torch.tensor([0, 1]))
    assert torch.equal(
        gen.ema(z, torch.tensor([5, 9]), class_labels=c),
        loaded.ema(z, torch.tensor([5, 9]), class_labels=c),
    )


def test_site_condition_is_learnt_and_sampled(smoke_config):
    """Two sites whose latents differ only by an offset: after brief training, samples asked
    for each site carry that site's offset (the class is the same everywhere)."""
    config = _site_config(smoke_config)
    gen = build_generator(config, seed=0)
    torch.manual_seed(0)
    n = 64
    sites = torch.arange(n) % 2
    z0 = torch.randn(n, *config.latent_shape) * 0.2 + (1.0 - 2.0 * sites.float()).view(
        -1, 1, 1, 1, 1
    )  # site 0 at +1, site 1 at -1
    labels = torch.zeros(n, dtype=torch.long)
    opt = torch.optim.AdamW(gen.unet.parameters(), lr=2e-3)
    sched = training_scheduler(config.diffusion)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        idx = torch.randint(0, n, (16,), generator=g)
        diffusion_step(
            gen.unet,
            opt,
            z0[idx],
            labels[idx],
            sched,
            config.diffusion,
            conditioning=gen.conditioning,
            sites=sites[idx],
            generator=g,
        )
    gen.unet.eval()

    def sample(site: int, guidance: float = 1.0, site_guidance: bool = False) -> float:
        z = sample_latents(
            lambda x, t, c, _r: gen.unet(x, t, class_labels=c),
            sampling_scheduler(config.diffusion, "ddim"),
            torch.zeros(16, dtype=torch.long),
            sites=torch.full((16,), site),
            latent_shape=config.latent_shape,
            conditioning=gen.conditioning,
            guidance=guidance,
            steps=20,
            generator=torch.Generator().manual_seed(1),
            device=torch.device("cpu"),
            site_guidance=site_guidance,
        )
        return float(z.mean())

    a, b = sample(0), sample(1)  # the data: +1 and -1; a class-only UNet gives both ~0
    assert a > 0.3 and b < -0.3 and a - b > 0.7, (a, b)
    # guidance amplifies the class only (one class here: little changes) unless asked to
    # amplify the site as well, which pushes each site's offset further out
    plain = sample(0, 3.0), sample(1, 3.0)
    amplified = sample(0, 3.0, site_guidance=True), sample(1, 3.0, site_guidance=True)
    spread = plain[0] - plain[1], amplified[0] - amplified[1]
    assert amplified[0] > plain[0] and amplified[1] < plain[1], (plain, amplified)
    assert spread[1] > spread[0] + 0.15, (plain, amplified)


def test_cohort_renders_each_site_and_records_it(smoke_config, tmp_path):
    config = _site_config(smoke_config)
    gen_dir = tmp_path / "generator"
    save_generator(build_generator(config, seed=0), gen_dir)
    gen = load_generator(gen_dir)
    plan = [
        PlannedCase("site_b-consolidation-0000", "consolidation", "site_b"),
        PlannedCase("pooled-nodule-0000", "nodule", "pooled"),
    ]
    manifest = generate_cohort(gen, gen_dir, plan, tmp_path / "cohort", batch_size=2)
    rows = {r.site: r.extra["site_condition"] for r in read_manifest(manifest)}
    assert rows == {"site_b": "site_b", "pooled": "null"}
    with pytest.raises(CohortError, match=r"unknown site 'site_z'.*site_a"):
        generate_cohort(
            gen, gen_dir, [PlannedCase("z-normal-0000", "normal", "site_z")], tmp_path / "c2"
        )
