"""Training steps: losses fall, EMA, balanced batches, scale factor, proximal term."""

from __future__ import annotations

import torch

from synthct.checkpoint import build_generator
from synthct.models.schedulers import training_scheduler
from synthct.training import (
    EMA,
    BalancedSampler,
    autoencoder_step,
    diffusion_step,
    encode_latents,
    latent_scale_factor,
    proximal_term,
)


def test_balanced_sampler_sees_rare_class():
    labels = torch.tensor([0] * 95 + [3] * 5)
    g = torch.Generator().manual_seed(0)
    drawn = labels[BalancedSampler(labels, balanced=True, generator=g)(2000)]
    assert 0.4 < (drawn == 3).float().mean() < 0.6
    natural = labels[BalancedSampler(labels, balanced=False, generator=g)(2000)]
    assert (natural == 3).float().mean() < 0.1


def test_steps_reduce_loss_on_a_fixed_batch(smoke_config):
    gen = build_generator(smoke_config, seed=0)
    x = torch.rand(2, 1, *smoke_config.data.shape) * 2 - 1
    opt = torch.optim.Adam(gen.autoencoder.parameters(), lr=3e-3)
    first = autoencoder_step(gen.autoencoder, opt, x, smoke_config.autoencoder)["l1"]
    for _ in range(15):
        last = autoencoder_step(gen.autoencoder, opt, x, smoke_config.autoencoder)["l1"]
    assert last < first
    z = encode_latents(gen.autoencoder, x)
    scale = latent_scale_factor(z)
    assert abs(float((z * scale).std()) - 1.0) < 1e-4
    sched = training_scheduler(smoke_config.diffusion)
    uopt = torch.optim.Adam(gen.unet.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1])
    losses = [
        diffusion_step(
            gen.unet,
            uopt,
            z * scale,
            labels,
            sched,
            smoke_config.diffusion,
            null_class=4,
            generator=torch.Generator().manual_seed(1),
        )["loss"]
        for _ in range(15)
    ]
    assert losses[-1] < losses[0]
    assert g.initial_seed() == 0


def test_ema_moves_towards_weights():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.5)
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.model.weight, before + 0.5)


def test_proximal_term_is_half_mu_squared_distance():
    model = torch.nn.Linear(2, 1, bias=False)
    ref = [p.detach().clone() - 1.0 for p in model.parameters()]
    term = proximal_term(model, ref, mu=0.2)()
    assert torch.isclose(term, torch.tensor(0.5 * 0.2 * 2.0))
