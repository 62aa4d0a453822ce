"""Model factories and schedulers built from the typed configs."""

from __future__ import annotations

import warnings

import pytest
import torch

from synthct.config import SAMPLERS
from synthct.models.autoencoder import build_autoencoder
from synthct.models.schedulers import sampling_scheduler, set_timesteps, training_scheduler
from synthct.models.unet import build_unet, num_class_embeds


def test_autoencoder_shapes(smoke_config):
    ae = build_autoencoder(smoke_config.autoencoder)
    x = torch.randn(2, 1, *smoke_config.data.shape)
    mu, sigma = ae.encode(x)
    assert tuple(mu.shape[1:]) == smoke_config.latent_shape
    assert ae.decode(mu).shape == x.shape


def test_unet_has_null_and_spare_class_slots(smoke_config):
    unet = build_unet(smoke_config.unet, latent_channels=2, num_classes=4)
    assert num_class_embeds(4, smoke_config.unet) == 4 + 1 + smoke_config.unet.spare_class_slots
    z = torch.randn(3, *smoke_config.latent_shape)
    out = unet(z, torch.tensor([1, 50, 99]), class_labels=torch.tensor([0, 3, 4]))  # 4 = null
    assert out.shape == z.shape


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_share_training_betas(smoke_config, sampler):
    train = training_scheduler(smoke_config.diffusion)
    sample = sampling_scheduler(smoke_config.diffusion, sampler)
    assert torch.allclose(train.alphas_cumprod, sample.alphas_cumprod)
    assert sample.config.prediction_type == smoke_config.diffusion.prediction_type


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_zero_terminal_snr_trains_at_pure_noise_and_samples_from_it(smoke_config, sampler):
    diffusion = smoke_config.diffusion.model_copy(update={"zero_terminal_snr": True})
    train = training_scheduler(diffusion)
    assert float(train.alphas_cumprod[-1]) == 0.0  # t = T: no signal left to read
    assert float(training_scheduler(smoke_config.diffusion).alphas_cumprod[-1]) > 1e-4
    z0, noise = torch.randn(2, 4, 4, 4, 4), torch.randn(2, 4, 4, 4, 4)
    last = torch.tensor([diffusion.num_train_timesteps - 1] * 2)
    assert torch.allclose(train.add_noise(z0, noise, last), noise)
    assert torch.allclose(train.get_velocity(z0, noise, last), -z0)  # v = -x0 there
    sample = sampling_scheduler(diffusion, sampler)
    set_timesteps(sample, 15, "cpu")
    assert int(sample.timesteps[0]) == diffusion.num_train_timesteps - 1  # starts at T


def test_zero_terminal_snr_needs_v_prediction():
    from synthct.config import DiffusionConfig

    with pytest.raises(ValueError, match="zero_terminal_snr needs prediction_type v_prediction"):
        DiffusionConfig(zero_terminal_snr=True, prediction_type="epsilon")


def test_unknown_sampler(smoke_config):
    with pytest.raises(ValueError, match="sampler must be one of"):
        sampling_scheduler(smoke_config.diffusion, "euler")


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_do_not_print_numpy2_notices(smoke_config, sampler):
    # diffusers' np.array(tensor) warned ~20 times in a demo log; nothing may reach the user
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scheduler = sampling_scheduler(smoke_config.diffusion, sampler)
        set_timesteps(scheduler, 15, "cpu")
    assert len(scheduler.timesteps) == 15
    assert [str(w.message) for w in caught] == []


def test_networks_run_under_bf16_autocast_close_to_fp32(smoke_config):
    """What `training.autocast` turns on for CUDA, checked on the CPU's bf16 autocast: the
    site-styled autoencoder, its gradient-checkpointed backward and the UNet run in mixed
    precision and stay within bf16 rounding of fp32 (same op lists for convolutions)."""
    with torch.random.fork_rng():  # the global RNG is left as the next tests expect it
        _bf16_close_to_fp32(smoke_config)


def _bf16_close_to_fp32(smoke_config) -> None:
    torch.manual_seed(0)
    ae_cfg = smoke_config.autoencoder.model_copy(
        update={"site_style": True, "gradient_checkpointing": True}
    )
    ae = build_autoencoder(ae_cfg, smoke_config.site_names)
    with torch.no_grad():
        for p in ae.site_style.parameters():
            p.normal_(0, 0.1)  # a trained style, not the zero start
    unet = build_unet(smoke_config.unet, latent_channels=2, num_classes=4)
    with torch.no_grad():
        for p in unet.out.parameters():
            p.normal_(0, 0.05)  # MONAI starts the output layer at zero: nothing to compare
    x = torch.randn(2, 1, *smoke_config.data.shape)
    sites = torch.tensor([0, 1])
    t, c = torch.tensor([10, 90]), torch.tensor([1, 2])

    def run():
        mu, _ = ae.encode(x)
        recon = ae.decode(mu, sites)
        return recon, unet(mu, t, class_labels=c)

    with torch.no_grad():
        ref_recon, ref_eps = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, eps = run()
        loss = (recon.float() - x).abs().mean() + eps.float().pow(2).mean()
    assert recon.dtype == torch.bfloat16 and eps.dtype == torch.bfloat16
    loss.backward()  # through the checkpointed encoder and decoder
    grads = [p.grad for p in ae.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    for got, want in ((recon, ref_recon), (eps, ref_eps)):
        err = float((got.detach().float() - want).abs().mean() / want.abs().mean())
        assert err < 0.05, err
