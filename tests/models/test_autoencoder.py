"""The site-styled autoencoder: the decoder renders a site's scanner style, and only there."""

from __future__ import annotations

import pytest
import torch

from synthct.checkpoint import build_generator, load_generator, save_generator
from synthct.fed.site_state import load_site_cases
from synthct.fed.task import LocalRun, build_phase_model, train_decoder_round
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


def test_a_plain_generator_is_adopted_with_site_awareness_unchanged(tmp_path, smoke_config):
    from synthct.adoption import adopt_generator
    from synthct.checkpoint import CheckpointError
    from synthct.sampling import sample_volumes

    plain = build_generator(smoke_config, seed=0)
    with torch.no_grad():  # a trained class table: adoption must keep it
        plain.ema.class_embedding.weight.normal_()
    aware = smoke_config.model_copy(
        update={
            "autoencoder": smoke_config.autoencoder.model_copy(update={"site_style": True}),
            "unet": smoke_config.unet.model_copy(update={"site_conditioning": True}),
        }
    )
    adopted = adopt_generator(plain, aware)
    assert adopted.renders_sites and adopted.conditioning.site_conditioned
    labels = torch.tensor([0, 1])
    site = smoke_config.site_names[0]

    def draw(gen, sites):
        g = torch.Generator().manual_seed(3)
        return sample_volumes(gen, labels, steps=3, guidance=2.0, generator=g, sites=sites)

    before = draw(plain, None)
    assert torch.allclose(draw(adopted, [site, site]), before, atol=1e-3)
    # exactly the old class embedding for every site (an untrained UNet barely reads it, so
    # the samples above alone would not show a random site table)
    classes = torch.arange(smoke_config.labels.num_classes)
    for name in (*smoke_config.site_names, None):
        index = adopted.conditioning.encode(
            classes, adopted.conditioning.site_indices([name] * len(classes))
        )
        assert torch.equal(
            adopted.ema.class_embedding(index), plain.ema.class_embedding(classes)
        ), name
    with pytest.raises(CheckpointError, match="turns off"):
        adopt_generator(adopted, smoke_config)
    wider = aware.model_copy(
        update={"unet": aware.unet.model_copy(update={"channels": (16, 32, 32)})}
    )
    with pytest.raises(CheckpointError, match="'unet' sections differ"):
        adopt_generator(plain, wider)


def test_adversarial_decoder_step_trains_decoder_and_discriminator(tmp_path, smoke_config):
    from synthct.training import LatentDecoder, decoder_step, detail_range

    cfg = smoke_config.autoencoder.model_copy(update={"adversarial_weight": 0.1})
    config = smoke_config.model_copy(update={"autoencoder": cfg})
    gen = build_generator(config, seed=0)
    assert gen.discriminator is not None
    decoder = LatentDecoder(gen.autoencoder, gen.discriminator)
    x = torch.rand(2, 1, *config.data.shape) * 2 - 1
    z = encode_latents(gen.autoencoder, x)
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    encoder = {k: v.clone() for k, v in gen.autoencoder.encoder.state_dict().items()}
    opt = torch.optim.AdamW(decoder.parameters(), lr=1e-3)
    detail = detail_range(cfg, config.data.hu_window)
    parts = decoder_step(decoder, opt, z, x, cfg, detail=detail)
    assert parts["adversarial"] > 0 and parts["discriminator"] > 0
    after = decoder.state_dict()
    moved = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert {"decoder", "discriminator"} <= moved
    assert all(torch.equal(v, gen.autoencoder.encoder.state_dict()[k]) for k, v in encoder.items())
    # the discriminator is kept while training goes on and dropped from a shipped generator
    saved = load_generator(save_generator(gen, tmp_path / "run"))
    assert torch.equal(
        saved.discriminator.state_dict()["final_conv.conv.weight"],
        gen.discriminator.state_dict()["final_conv.conv.weight"],
    )
    save_generator(gen, tmp_path / "run", sampling_only=True)
    assert not (tmp_path / "run" / "discriminator.safetensors").exists()
