"""Per-site norms in the UNet: exact at conversion, each case normalised with its own site's
row, copies (the EMA) set their own sites, and a call without the site is refused."""

from __future__ import annotations

import copy

import pytest
import torch

from synthct.config import ConfigError, load_config, packaged_config_path
from synthct.models.site_norm import SiteGroupNorm, add_site_norms
from synthct.models.unet import build_unet, num_site_embeds

SITES = 3


def _unet(smoke_config, site_norms: bool):
    cfg = smoke_config.unet.model_copy(update={"site_conditioning": True, "site_norms": site_norms})
    torch.manual_seed(0)
    unet = build_unet(cfg, latent_channels=4, num_classes=4, num_sites=SITES)
    with torch.no_grad():  # MONAI zero-initialises the output convolution: make it speak
        for name, p in unet.named_parameters():
            if name.startswith("out."):
                p.normal_(0.0, 0.05)
    return unet, cfg


def _inputs(slots: int):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, 4, 8, 8, 8, generator=g)
    t = torch.tensor([10, 400, 900])
    # classes 0, 1, 2 at sites 0, 1, 1 (index = class * site_slots + site)
    labels = torch.tensor([0 * slots + 0, 1 * slots + 1, 2 * slots + 1])
    return z, t, labels


def test_converted_norms_predict_exactly_as_before_and_rows_act_per_site(smoke_config):
    plain, cfg = _unet(smoke_config, site_norms=False)
    slots = num_site_embeds(SITES, cfg)
    z, t, labels = _inputs(slots)
    with torch.no_grad():
        before = plain(z, t, class_labels=labels)
        converted = add_site_norms(copy.deepcopy(plain), slots)
        assert any(isinstance(m, SiteGroupNorm) for m in converted.modules())
        assert not any(isinstance(m, torch.nn.GroupNorm) for m in converted.modules())
        torch.testing.assert_close(converted(z, t, class_labels=labels), before)
        # move site 1's rows only: the cases of site 1 change, site 0's does not
        for name, p in converted.named_parameters():
            if name.endswith("site_bias"):
                p[1] += 0.5
        after = converted(z, t, class_labels=labels)
    torch.testing.assert_close(after[0], before[0])
    assert (after[1:] - before[1:]).abs().max() > 1e-3


def test_a_copy_sets_its_own_sites_and_a_call_without_them_is_refused(smoke_config):
    unet, cfg = _unet(smoke_config, site_norms=True)
    slots = num_site_embeds(SITES, cfg)
    z, t, labels = _inputs(slots)
    ema = copy.deepcopy(unet)
    with torch.no_grad():
        unet(z, t, class_labels=labels)
        ema(z[:1], t[:1], class_labels=labels[:1])  # another batch: the original keeps its own
        norm = next(m for m in unet.modules() if isinstance(m, SiteGroupNorm))
        assert norm.sites.tolist() == [0, 1, 1]
        with pytest.raises(RuntimeError, match="needs class_labels"):
            unet(z, t)


def test_site_norms_need_the_site_condition():
    with pytest.raises(ConfigError, match="site_norms needs site_conditioning"):
        load_config(packaged_config_path("smoke"), ["unet.site_norms=true"])


def test_a_generator_with_site_norms_saves_and_loads(tmp_path, smoke_config):
    from synthct.checkpoint import build_generator, load_generator, save_generator

    config = load_config(
        packaged_config_path("smoke"), ["unet.site_conditioning=true", "unet.site_norms=true"]
    )
    gen = build_generator(config, seed=0)
    save_generator(gen, tmp_path / "g")
    loaded = load_generator(tmp_path / "g")
    for key, value in gen.ema.state_dict().items():
        torch.testing.assert_close(loaded.ema.state_dict()[key], value)
    assert any(k.endswith("site_weight") for k in loaded.unet.state_dict())


def test_a_site_conditioned_generator_adopted_with_site_norms_samples_as_before():
    from synthct.adoption import adopt_generator
    from synthct.checkpoint import CheckpointError, build_generator

    sets = ["unet.site_conditioning=true"]
    before = build_generator(load_config(packaged_config_path("smoke"), sets), seed=0)
    with torch.no_grad():  # a trained-looking output layer (MONAI starts it at zero)
        for name, p in before.ema.named_parameters():
            if name.startswith("out."):
                p.normal_(0.0, 0.05)
    config = load_config(packaged_config_path("smoke"), [*sets, "unet.site_norms=true"])
    adopted = adopt_generator(before, config)
    slots = next(m for m in adopted.ema.modules() if isinstance(m, SiteGroupNorm)).site_weight
    _, t, labels = _inputs(slots.shape[0])
    z = torch.randn(3, *config.latent_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(
            adopted.ema(z, t, class_labels=labels), before.ema(z, t, class_labels=labels)
        )
    back = config.model_copy(update={"unet": config.unet.model_copy(update={"site_norms": False})})
    with pytest.raises(CheckpointError, match="site_norms"):
        adopt_generator(adopted, back)
