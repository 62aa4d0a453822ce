"""Site plugins: export/validate round trip, refusals, Fusion == peft's cat merge, Mixture
routing (null branch included)."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraModel

from synthct.checkpoint import build_generator, load_generator, save_generator
from synthct.cli import main
from synthct.plugins.adapter import PluginError, adapter_state, attach_adapter
from synthct.plugins.merge import MixtureDenoiser, fuse, plugin_deltas
from synthct.plugins.registry import (
    Plugin,
    add_plugin,
    list_plugins,
    load_plugins,
    read_index,
    validate_plugin,
)


@pytest.fixture(scope="module")
def trained_plugin(tmp_path_factory, base, smoke_sites):
    out = tmp_path_factory.mktemp("plugins") / "site_c"
    args = ["plugin", "train", "--generator", str(base), "--site", "site_c"]
    assert main([*args, "--data", str(smoke_sites), "--out", str(out), "--steps", "3"]) == 0
    return out


def test_plugin_round_trip_and_size(trained_plugin, base, smoke_config):
    gen = load_generator(base)
    plugin = validate_plugin(trained_plugin, gen, base)
    meta = plugin.meta
    assert meta["site"] == "site_c" and meta["rank"] == smoke_config.plugins.rank
    assert not any(".skip_connection." in m for m in meta["target_modules"])  # no 1x1x1 convs
    assert meta["classes_seen"]["consolidation"] >= 1
    assert meta["weights_bytes"] == (trained_plugin / "plugin.safetensors").stat().st_size
    # the exported adapter loads back into a fresh UNet and reproduces the adapted outputs
    reloaded = attach_adapter(copy.deepcopy(gen.ema), plugin.config, "r", meta["target_modules"])
    from synthct.plugins.adapter import load_adapter_state

    load_adapter_state(reloaded, plugin.state, "r")
    assert all(torch.equal(adapter_state(reloaded, "r")[k], v) for k, v in plugin.state.items())


@pytest.mark.parametrize("targets", ["conv+linear", "attention+time"])
def test_demo_plugin_is_under_a_tenth_of_a_unet_update(demo_config, targets):
    from synthct.models.unet import build_unet

    unet = build_unet(
        demo_config.unet,
        latent_channels=demo_config.autoencoder.latent_channels,
        num_classes=demo_config.labels.num_classes,
    )
    full = sum(p.numel() for p in unet.parameters())
    cfg = demo_config.plugins.model_copy(update={"targets": targets})
    adapter = sum(v.numel() for v in adapter_state(attach_adapter(unet, cfg, "x"), "x").values())
    assert adapter <= 0.10 * full, (adapter, full)


def test_registry_refuses_tampered_foreign_and_misshapen(
    tmp_path, trained_plugin, base, smoke_config
):
    gen = load_generator(base)
    registry = tmp_path / "reg"
    add_plugin(registry, trained_plugin, gen, base)
    assert [r["site"] for r in list_plugins(registry)] == ["site_c"]
    with pytest.raises(PluginError, match="already registered"):
        add_plugin(registry, trained_plugin, gen, base)
    bad = tmp_path / "tampered"
    bad.mkdir()
    (bad / "plugin.json").write_text((trained_plugin / "plugin.json").read_text())
    data = bytearray((trained_plugin / "plugin.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (bad / "plugin.safetensors").write_bytes(bytes(data))
    with pytest.raises(PluginError, match="altered or truncated"):
        add_plugin(registry, bad, gen, base)
    other = tmp_path / "other"
    save_generator(build_generator(smoke_config, seed=1), other)
    with pytest.raises(PluginError, match="base generator"):
        validate_plugin(trained_plugin, load_generator(other), other)
    misshapen = tmp_path / "misshapen"
    misshapen.mkdir()
    meta = json.loads((trained_plugin / "plugin.json").read_text())
    meta["rank"] = meta["rank"] * 2  # claims another adapter than the tensors hold
    (misshapen / "plugin.json").write_text(json.dumps(meta))
    (misshapen / "plugin.safetensors").write_bytes(
        (trained_plugin / "plugin.safetensors").read_bytes()
    )
    with pytest.raises(PluginError, match="do not fit"):
        add_plugin(registry, misshapen, gen, base)
    assert len(load_plugins(registry, gen, base)) == 1


def test_fusion_equals_peft_cat_merge(base, smoke_config, random_plugin):
    gen = load_generator(base)
    cfg = smoke_config.plugins
    plugins = [
        random_plugin(gen, cfg, {"nodule": 10}, 1),
        random_plugin(gen, cfg, {"consolidation": 5}, 2),
    ]
    weights = [0.7, 0.3]
    fused = fuse(gen, plugins, weights)
    targets = plugins[0].meta["target_modules"]
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=targets, lora_dropout=0.0)
    model = LoraModel(copy.deepcopy(gen.ema), lora, "p0")
    model.peft_config["p1"] = lora
    model.inject_adapter(model.model, "p1")
    from peft import set_peft_model_state_dict

    for i, p in enumerate(plugins):
        set_peft_model_state_dict(model.model, p.state, adapter_name=f"p{i}")
    model.add_weighted_adapter(["p0", "p1"], weights, "cat", combination_type="cat")
    model.set_adapter("cat")
    merged = model.merge_and_unload(adapter_names=["cat"]).state_dict()
    ours = fused.ema.state_dict()
    changed = 0
    for k, v in ours.items():
        assert torch.allclose(v, merged[k], atol=1e-6), k
        changed += int(not torch.equal(v, gen.ema.state_dict()[k]))
    assert changed == len(targets)
    # peft's "linear" combination is not the weighted sum of deltas
    base_state = gen.ema.state_dict()
    name = f"{targets[1]}.weight"
    want = sum(
        w * plugin_deltas(p, base_state)[name] for p, w in zip(plugins, weights, strict=True)
    )
    assert torch.allclose((ours[name] - base_state[name]).double(), want, atol=1e-6)


def test_mixture_routes_each_class_to_its_plugin(base, smoke_config, random_plugin):
    gen = load_generator(base)
    cfg = smoke_config.plugins
    nodule, consolidation = (
        smoke_config.labels.classes.index(c) for c in ("nodule", "consolidation")
    )
    plugins = [
        random_plugin(gen, cfg, {"nodule": 10}, 1),
        random_plugin(gen, cfg, {"consolidation": 5}, 2),
    ]
    mix = MixtureDenoiser(gen, plugins)
    z = torch.randn(4, *smoke_config.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 50)
    null = gen.null_class
    requested = torch.tensor([nodule, consolidation, 0, nodule])
    labels = torch.tensor([nodule, consolidation, 0, null])  # the last row is a null branch
    out = mix(z, t, labels, requested)

    def alone(plugin: Plugin, rows, labs):
        unet = attach_adapter(
            copy.deepcopy(gen.ema), plugin.config, "a", plugin.meta["target_modules"]
        )
        from synthct.plugins.adapter import load_adapter_state

        load_adapter_state(unet, plugin.state, "a")
        with torch.no_grad():
            return unet.eval()(z[rows], t[rows], class_labels=labs)

    assert torch.allclose(out[0:1], alone(plugins[0], [0], labels[0:1]), atol=1e-5)
    assert torch.allclose(out[1:2], alone(plugins[1], [1], labels[1:2]), atol=1e-5)
    with torch.no_grad():
        base_out = gen.ema(z[2:3], t[2:3], class_labels=labels[2:3])
    assert torch.allclose(out[2:3], base_out, atol=1e-5)  # nobody saw "normal": the base answers
    # the null branch of a nodule sample is the nodule plugin's unconditional prediction
    assert torch.allclose(out[3:4], alone(plugins[0], [3], labels[3:4]), atol=1e-5)
    assert not torch.allclose(out[3:4], base_out, atol=1e-3)


def test_cli_sample_with_plugins(tmp_path, trained_plugin, base, capsys, caplog):
    registry = tmp_path / "reg"
    add = ["plugin", "add", str(registry), str(trained_plugin), "--generator", str(base)]
    assert main(add) == 2  # by hand, a plugin enters only when someone vouches for it
    assert "without the gate's judgement" in capsys.readouterr().err
    assert not registry.exists()
    assert main([*add, "--ungated"]) == 0
    entry = next(iter(read_index(registry)["plugins"].values()))
    assert entry["acceptance"] == {
        "gated": False, "accepted": True, "why": "added by hand with --ungated"
    }  # fmt: skip
    assert main(["plugin", "list", str(registry)]) == 0
    assert "active, ungated" in capsys.readouterr().out
    caplog.set_level(logging.INFO, logger="synthct.plugins.registry")
    for merge in ("fusion", "mixture"):
        out = tmp_path / merge
        args = [
            "sample",
            "--generator",
            str(base),
            "--label",
            "consolidation",
            "--n",
            "2",
            "--steps",
            "2",
        ]
        assert main([*args, "--out", str(out), "--plugins", str(registry), "--merge", merge]) == 0
        assert len(list(out.glob("*.nii.gz"))) == 2
    # merged, and named with the reason it was let in ungated
    assert "not judged by the gate" in caplog.text and "with --ungated" in caplog.text
    assert (
        main(["plugin", "add", str(registry), str(tmp_path / "nothing"), "--generator", str(base)])
        == 2
    )
