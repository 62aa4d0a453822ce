"""The site-styled autoencoder: the decoder renders a site's scanner style, and only there."""

from __future__ import annotations

import pytest
import torch

from synthct.checkpoint import build_generator, load_generator, save_generator
from synthct.fed.task import LocalRun, build_phase_model, load_site_cases, train_decoder_round
from synthct.models.autoencoder import SiteStyledAutoencoderKL, build_autoencoder
from synthct.models.conditioning import UnknownSiteError
from synthct.sampling import decode_latents, reconstruct, sites_to_indices
from synthct.training import encode_latents


@pytest.fixture(scope="module")
def styled_config(smoke_config):
    ae = smoke_config.autoencoder.model_copy(update={"site_style": True})
    return smoke_config.model_copy(update={"autoencoder": ae})


def test_fresh_style_decodes_as_the_plain_decoder(smoke_config, styled_config):
    torch.manual_seed(0)
    plain = build_autoencoder(smoke_config.autoencoder)
    styled = build_autoencoder(styled_config.autoencoder, styled_config.site_names)
    assert isinstance(styled, SiteStyledAutoencoderKL)
    styled.load_state_dict(plain.state_dict(), strict=False)  # same weights, zero style
    z = torch.randn(3, *smoke_config.latent_shape)
    rows = styled.site_style.indices([smoke_config.site_names[0], None, "pooled"])
    assert rows.tolist()[1:] == [styled.site_style.null_site] * 2
    assert torch.allclose(styled.decode(z, rows), plain.decode(z))
    x = torch.zeros(1, 1, *smoke_config.data.shape)
    assert styled(x)[0].shape == x.shape  # the autoencoder phase decodes with the null site
    with pytest.raises(ValueError, match="site vocabulary"):
        build_autoencoder(styled_config.autoencoder)


def test_a_site_row_styles_that_site_only(tmp_path, styled_config):
    gen = build_generator(styled_config, seed=0)
    site_a, site_b = styled_config.site_names[:2]
    style = gen.autoencoder.site_style
    with torch.no_grad():
        style.output_affine.weight[style.indices([site_a])[0]] = torch.tensor([0.5, 0.1])
    z = torch.randn(2, *styled_config.latent_shape)
    a, b = decode_latents(gen, z[:1].repeat(2, 1, 1, 1, 1), sites=[site_a, site_b])
    plain = decode_latents(gen, z[:1])
    assert torch.allclose(b, plain[0], atol=1e-5) and not torch.allclose(a, plain[0], atol=1e-2)
    # the style travels with the saved generator (hash-checked like every weight)
    loaded = load_generator(save_generator(gen, tmp_path / "gen"))
    both = [site_a, site_b]
    assert torch.equal(decode_latents(loaded, z, sites=both), decode_latents(gen, z, sites=both))
    assert loaded.renders_sites
    with pytest.raises(UnknownSiteError, match="site_z"):
        sites_to_indices(gen, ["site_z"])
    with pytest.raises(ValueError, match="2 sites given for 1"):
        decode_latents(gen, z[:1], sites=[site_a, site_b])


def test_decoder_round_learns_the_style_of_the_sites_it_sees(styled_config, smoke_sites):
    site = styled_config.site_names[0]
    cases = load_site_cases(styled_config, smoke_sites, site)
    gen = build_generator(styled_config, seed=0)
    latents = encode_latents(gen.autoencoder, cases.images)
    weights = build_phase_model(styled_config, "decoder").state_dict()
    assert any(k.startswith("site_style.") for k in weights)
    result = train_decoder_round(styled_config, weights, latents, cases, LocalRun(steps=6, seed=1))
    rows = gen.autoencoder.site_style.indices([site, styled_config.site_names[1]])
    bias = result.state["site_style.feature_bias.weight"]
    assert bias[rows[0]].abs().sum() > 0  # this site's row moved
    assert bias[rows[1]].abs().sum() == 0  # a site it never saw did not
    # reconstructions decode each case for its own site
    gen.autoencoder.load_state_dict(result.state, strict=False)
    own = reconstruct(gen, cases.images[:2], sites=cases.sites[:2])
    assert not torch.allclose(own, reconstruct(gen, cases.images[:2]))
