"""Decoder adapters: a plugin that carries its site's scanner style on the decoder, checked like
the UNet's, small beside a full generator update, and used only for the cases made for its
site."""

from __future__ import annotations

import json

import pytest
import torch

from synthct.checkpoint import build_generator, load_generator
from synthct.cli import main
from synthct.data.dataset import load_cases
from synthct.plugins.adapter import (
    PluginError,
    adapter_state,
    attach_adapter,
    attach_decoder_adapter,
)
from synthct.plugins.merge import fuse, with_site_decoders
from synthct.plugins.registry import add_plugin, load_plugins, validate_plugin
from synthct.sampling import reconstruct


@pytest.fixture(scope="module")
def styled_plugin(tmp_path_factory, base, smoke_sites):
    out = tmp_path_factory.mktemp("plugins") / "site_b"
    args = ["plugin", "train", "--generator", str(base), "--site", "site_b", "--steps", "2"]
    args += ["--data", str(smoke_sites), "--out", str(out)]
    assert main([*args, "--decoder-rank", "2", "--decoder-steps", "40"]) == 0
    return out


def test_the_decoder_adapter_learns_its_sites_scans_and_decodes_only_their_cases(
    tmp_path, styled_plugin, base, smoke_sites
):
    gen = load_generator(base)
    add_plugin(tmp_path / "reg", styled_plugin, gen, base)
    (plugin,) = load_plugins(tmp_path / "reg", gen, base)
    assert plugin.meta["plugin_format"] == 2 and plugin.decoder_rank == 2
    assert plugin.decoder_state and not any(k.startswith("autoencoder/") for k in plugin.state)
    site_b = load_cases(smoke_sites, gen.config, splits=("train",), sites=("site_b",))
    n = len(site_b)
    fused = fuse(gen, [plugin])
    base_error = (reconstruct(gen, site_b.images) - site_b.images).abs().mean()
    styled = reconstruct(fused, site_b.images, sites=["site_b"] * n)
    assert (styled - site_b.images).abs().mean() < 0.9 * base_error  # it learnt site_b's scans
    # a case made for another site, or pooled, decodes with the base decoder, bit for bit
    for other in ("site_a", "pooled"):
        again = reconstruct(fused, site_b.images, sites=[other] * n)
        assert torch.equal(again, reconstruct(gen, site_b.images)), other
    # one batch, two sites: each case decodes with its own site's decoder (batch sizes differ,
    # so equal up to float rounding)
    mixed = reconstruct(fused, site_b.images[:2], sites=["site_b", "site_a"])
    assert torch.allclose(mixed[0], styled[0], atol=1e-5)
    assert torch.allclose(mixed[1], again[1], atol=1e-5)
    assert not torch.allclose(mixed[0], again[0], atol=1e-3)
    # Mixture keeps the base UNet and decodes the same way
    mixture = with_site_decoders(gen, [plugin])
    assert torch.allclose(
        reconstruct(mixture, site_b.images[:1], sites=["site_b"]), styled[:1], atol=1e-5
    )


def test_decoder_tensors_must_fit_what_plugin_json_declares(tmp_path, styled_plugin, base):
    gen = load_generator(base)
    meta = json.loads((styled_plugin / "plugin.json").read_text())

    def altered(name: str, change) -> object:
        folder = tmp_path / name
        folder.mkdir()
        m = json.loads(json.dumps(meta))
        change(m)
        (folder / "plugin.json").write_text(json.dumps(m))
        (folder / "plugin.safetensors").write_bytes(
            (styled_plugin / "plugin.safetensors").read_bytes()
        )
        return folder

    with pytest.raises(PluginError, match="decoder tensors do not fit"):
        validate_plugin(altered("rank", lambda m: m["decoder"].update(rank=4)), gen, base)
    with pytest.raises(PluginError, match="declares no decoder"):
        validate_plugin(altered("undeclared", lambda m: m.pop("decoder")), gen, base)


def test_demo_plugin_with_decoder_is_under_a_tenth_of_a_generator_update(demo_config):
    gen = build_generator(demo_config, seed=0)
    full = sum(p.numel() for p in gen.ema.parameters()) + sum(
        p.numel() for p in gen.autoencoder.decoder.parameters()
    )
    unet = sum(
        v.numel()
        for v in adapter_state(attach_adapter(gen.ema, demo_config.plugins, "x"), "x").values()
    )
    decoder = sum(
        v.numel()
        for v in adapter_state(attach_decoder_adapter(gen.autoencoder, 4, "x"), "x").values()
    )
    assert unet + decoder <= 0.10 * full, (unet, decoder, full)


def test_a_late_sites_cases_are_drawn_site_agnostic_and_decoded_in_its_style(smoke_config):
    from dataclasses import replace

    from synthct.models.conditioning import UnknownSiteError
    from synthct.sampling import sites_to_indices

    unet = smoke_config.unet.model_copy(update={"site_conditioning": True})
    gen = build_generator(smoke_config.model_copy(update={"unet": unet}), seed=0)
    with pytest.raises(UnknownSiteError, match="site_x"):
        sites_to_indices(gen, ["site_x"])
    late = replace(gen, site_decoders={"site_x": gen.autoencoder})  # site_x's plugin decoder
    rows = sites_to_indices(late, ["site_x", "site_a", "pooled"])
    null = gen.conditioning.null_site
    assert rows.tolist() == [null, gen.conditioning.sites.index("site_a"), null]
    with pytest.raises(UnknownSiteError, match="site_y"):  # no plugin, no style: still an error
        sites_to_indices(late, ["site_y"])
