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
