"""Training steps: losses fall, EMA, balanced batches, scale factor, proximal term."""

from __future__ import annotations

import pytest
import torch

from synthct.checkpoint import build_generator
from synthct.models.latent_norm import fit_latent_norm
from synthct.models.schedulers import training_scheduler
from synthct.training import (
    EMA,
    BalancedSampler,
    LatentDecoder,
    autoencoder_step,
    decoder_step,
    detail_range,
    diffusion_step,
    ema_decay_at,
    encode_latents,
    proximal_term,
    reconstruction_loss,
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
    detail = detail_range(smoke_config.autoencoder, smoke_config.data.hu_window)
    first = autoencoder_step(gen.autoencoder, opt, x, smoke_config.autoencoder, detail=detail)
    for _ in range(15):
        last = autoencoder_step(gen.autoencoder, opt, x, smoke_config.autoencoder, detail=detail)
    assert last["loss"] < first["loss"] and last["detail"] > 0
    z = encode_latents(gen.autoencoder, x)
    norm = fit_latent_norm(z, "global")
    scaled = norm.apply(z)
    assert abs(float(scaled.std()) - 1.0) < 1e-4
    sched = training_scheduler(smoke_config.diffusion)
    uopt = torch.optim.Adam(gen.unet.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1])
    losses = [
        diffusion_step(
            gen.unet,
            uopt,
            scaled,
            labels,
            sched,
            smoke_config.diffusion,
            conditioning=gen.conditioning,
            generator=torch.Generator().manual_seed(1),
        )["loss"]
        for _ in range(15)
    ]
    assert losses[-1] < losses[0]
    assert g.initial_seed() == 0


def test_ema_moves_towards_weights():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.5, step=None)  # no warm-up: a trained EMA being continued
    before = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.model.weight, before + 0.5)


def test_ema_warm_up_copies_first_then_follows_diffusers_schedule():
    assert ema_decay_at(0.999, 1) == 0.0
    assert ema_decay_at(0.999, 2) == pytest.approx(2 / 11)
    assert ema_decay_at(0.999, 100_000) == 0.999
    model = torch.nn.Linear(2, 1)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # first step: the EMA is the model
    assert torch.equal(ema.model.weight, model.weight)
    # a round of k steps folds in like k single steps towards the same weights
    one, many = EMA(model, 0.999, step=5), EMA(model, 0.999, step=5)
    with torch.no_grad():
        model.weight.add_(1.0)
    for _ in range(3):
        one.update(model)
    many.update(model, steps=3)
    assert one.step == many.step == 8
    assert torch.allclose(one.model.weight, many.model.weight, atol=1e-6)


def test_proximal_term_is_half_mu_squared_distance():
    model = torch.nn.Linear(2, 1, bias=False)
    ref = [p.detach().clone() - 1.0 for p in model.parameters()]
    term = proximal_term(model, ref, mu=0.2)()
    assert torch.isclose(term, torch.tensor(0.5 * 0.2 * 2.0))


def test_detail_term_weights_haze_inside_the_lung_window(smoke_config):
    cfg = smoke_config.autoencoder
    detail = detail_range(cfg, smoke_config.data.hu_window)
    assert detail == pytest.approx(((-1000 + 1024) / 1024 - 1, (-300 + 1024) / 1024 - 1))
    x = torch.full((1, 1, 8, 8, 8), detail[0] + 0.05)  # lung parenchyma
    haze = x.clone()
    haze[..., 2:6, 2:6, 2:6] += 0.1  # +100 HU inside the window
    bone = torch.full_like(x, 0.5)
    bone_err = bone.clone()
    bone_err[..., 2:6, 2:6, 2:6] += 0.1  # the same error outside it
    plain = cfg.model_copy(update={"detail_weight": 0.0})
    base_haze, _ = reconstruction_loss(haze, x, plain)
    base_bone, _ = reconstruction_loss(bone_err, bone, plain)
    assert float(base_haze) == pytest.approx(float(base_bone))
    haze_loss, parts = reconstruction_loss(haze, x, cfg, detail)
    bone_loss, _ = reconstruction_loss(bone_err, bone, cfg, detail)
    assert parts["detail"] > 0 and float(bone_loss) == pytest.approx(float(base_bone))
    assert float(haze_loss) > 3 * float(base_haze)  # 2048/700 HU scale + the plain terms
    with pytest.raises(ValueError, match="detail"):
        reconstruction_loss(haze, x, cfg)


def test_decoder_step_trains_the_decoding_half_only(smoke_config):
    gen = build_generator(smoke_config, seed=0)
    ae = gen.autoencoder
    decoder = LatentDecoder(ae)
    names = set(decoder.state_dict())
    assert names and names <= set(ae.state_dict())
    assert all(k.startswith(("decoder.", "post_quant_conv.")) for k in names)
    x = torch.rand(2, 1, *smoke_config.data.shape) * 2 - 1
    z = encode_latents(ae, x)
    before = {k: v.clone() for k, v in ae.state_dict().items()}
    opt = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    detail = detail_range(smoke_config.autoencoder, smoke_config.data.hu_window)
    steps = [decoder_step(decoder, opt, z, x, smoke_config.autoencoder, detail=detail)]
    steps += [
        decoder_step(decoder, opt, z, x, smoke_config.autoencoder, detail=detail) for _ in range(15)
    ]
    assert steps[-1]["loss"] < steps[0]["loss"]
    after = ae.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]) != (k in names), k  # decoder moved, encoder did not
    assert torch.equal(encode_latents(ae, x), z)
    assert torch.allclose(decoder(z), ae.decode(z))
