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
    random_patch,
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


def test_random_patch_crops_volumes_and_their_latents_alike():
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 16**3, dtype=torch.float32).view(2, 1, 16, 16, 16)
    z = torch.nn.functional.avg_pool3d(x, 4)  # a latent grid 4x coarser
    seen = set()
    for _ in range(20):
        crop, zc = random_patch(x, (8, 8, 8), g, latents=z, downsample=4)
        assert crop.shape == (2, 1, 8, 8, 8) and zc.shape == (2, 1, 2, 2, 2)
        assert torch.equal(torch.nn.functional.avg_pool3d(crop, 4), zc)  # the same region
        seen.add(int(crop[0, 0, 0, 0, 0]))
    assert len(seen) > 1  # the place moves


@pytest.mark.parametrize("name", ["chest64", "chest128"])
def test_clinical_config_trains_and_samples_one_step_at_reduced_width(name):
    """Each clinical config's networks, at a width a CPU runs, through one real step of every
    phase: shapes from volume to latents and back (whole or by sliding window)."""
    from synthct.config import load_config
    from synthct.sampling import decode_latents

    levels = len(load_config(name).unet.channels)
    config = load_config(
        name,
        [
            "autoencoder.channels=[8, 8, 8]",
            "autoencoder.norm_num_groups=4",
            f"unet.channels={[8] * levels}",
            "unet.num_head_channels=8",
            "unet.norm_num_groups=4",
        ],
    )
    gen = build_generator(config, seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, *config.data.shape, generator=g) * 2 - 1
    opt = torch.optim.AdamW(gen.autoencoder.parameters(), lr=1e-4)
    parts = autoencoder_step(
        gen.autoencoder,
        opt,
        x,
        config.autoencoder,
        detail=detail_range(config.autoencoder, config.data.hu_window),
        patch=config.train.ae_patch,
        generator=g,
    )
    assert torch.isfinite(torch.tensor(parts["loss"]))
    z = encode_latents(gen.autoencoder, x)
    assert z.shape == (1, *config.latent_shape)
    opt = torch.optim.AdamW(gen.unet.parameters(), lr=1e-4)
    parts = diffusion_step(
        gen.unet,
        opt,
        z,
        torch.tensor([1]),
        training_scheduler(config.diffusion),
        config.diffusion,
        conditioning=gen.conditioning,
        generator=g,
    )
    assert torch.isfinite(torch.tensor(parts["loss"]))
    out = decode_latents(gen, gen.latent_norm.apply(z), patch=config.sampling.decode_patch)
    assert out.shape == x.shape and torch.isfinite(out).all()
