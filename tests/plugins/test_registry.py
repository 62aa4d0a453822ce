"""The plugin registry: versioned history, a base that moves on, stale plugins left out of
merges, re-fitted plugins that retire them, and format-1 registries still read."""

from __future__ import annotations

import json
import logging

import pytest

from synthct.artifacts import read_json
from synthct.checkpoint import build_generator, load_generator, save_generator
from synthct.cli import main
from synthct.plugins.adapter import PluginError, read_plugin_weights
from synthct.plugins.registry import add_plugin, list_plugins, load_plugins, move_base


@pytest.fixture(scope="module")
def site_c_plugin(tmp_path_factory, base, smoke_sites):
    out = tmp_path_factory.mktemp("plugins") / "site_c"
    args = ["plugin", "train", "--generator", str(base), "--site", "site_c"]
    assert main([*args, "--data", str(smoke_sites), "--out", str(out), "--steps", "2"]) == 0
    return out


def test_every_change_is_versioned_with_who_and_which_base(tmp_path, site_c_plugin, base):
    gen = load_generator(base)
    registry = tmp_path / "reg"
    plugin = add_plugin(registry, site_c_plugin, gen, base, by="flower node 7")
    index = read_json(registry / "registry.json")
    assert index["version"] == 1 and index["registry_format"] == 2
    entry = index["plugins"][plugin.name]
    assert entry["status"] == "active" and entry["by"] == "flower node 7"
    assert (
        entry["sha256"] == plugin.meta["weights_sha256"]
        and entry["base"] == index["base_generator_sha256"]
    )
    (event,) = index["history"]
    assert event["event"] == "added" and event["site"] == "site_c" and event["version"] == 1
    (row,) = list_plugins(registry)
    assert row["status"] == "active" and row["by"] == "flower node 7" and row["version"] == 1


def test_a_moved_base_makes_plugins_stale_until_refitted(
    tmp_path, site_c_plugin, base, smoke_config, smoke_sites, caplog
):
    gen = load_generator(base)
    registry = tmp_path / "reg"
    old = add_plugin(registry, site_c_plugin, gen, base)
    new_base = tmp_path / "new_base"
    save_generator(build_generator(smoke_config, seed=5), new_base)
    new_gen = load_generator(new_base)
    with pytest.raises(PluginError, match="move the registry to the new base"):
        add_plugin(registry, site_c_plugin, new_gen, new_base)
    assert move_base(registry, new_base) == [old.name]
    index = read_json(registry / "registry.json")
    assert index["version"] == 2 and index["plugins"][old.name]["status"] == "stale"
    assert index["history"][-1]["event"] == "base moved"
    with pytest.raises(PluginError, match="no active plugins registered \\(1 stale"):
        load_plugins(registry, new_gen, new_base)
    with pytest.raises(PluginError, match="serves base generator"):  # the old base is gone
        load_plugins(registry, gen, base)
    # the site re-fits its stale plugin on the new base: same settings, its weights the start
    refit = tmp_path / "refit"
    args = ["plugin", "train", "--generator", str(new_base), "--site", "site_c", "--steps", "1"]
    args += ["--data", str(smoke_sites), "--out", str(refit), "--rebase-from", str(old.path)]
    assert main(args) == 0
    meta, _ = read_plugin_weights(refit)
    assert meta["rebased_from"] == old.name and meta["rank"] == old.meta["rank"]
    wrong_site = ["plugin", "train", "--generator", str(new_base), "--site", "site_a"]
    wrong_site += ["--data", str(smoke_sites), "--out", str(tmp_path / "x")]
    assert main([*wrong_site, "--rebase-from", str(old.path)]) != 0
    # rebased_from may retire only a stale plugin of the same site
    forged = tmp_path / "forged"
    forged.mkdir()
    meta_f = json.loads((refit / "plugin.json").read_text())
    meta_f["site"] = "site_a"
    (forged / "plugin.json").write_text(json.dumps(meta_f))
    (forged / "plugin.safetensors").write_bytes((refit / "plugin.safetensors").read_bytes())
    with pytest.raises(PluginError, match="not a stale plugin of site 'site_a'"):
        add_plugin(registry, forged, new_gen, new_base)
    assert read_json(registry / "registry.json")["version"] == 2  # nothing changed
    assert not (registry / f"site_a-{meta_f['weights_sha256'][:12]}").exists()
    new = add_plugin(registry, refit, new_gen, new_base)
    index = read_json(registry / "registry.json")
    assert index["plugins"][old.name] == {
        **index["plugins"][old.name],
        "status": "rebased",
        "replaced_by": new.name,
    }
    assert index["history"][-1]["replaces"] == old.name and index["version"] == 3
    caplog.set_level(logging.WARNING)
    (loaded,) = load_plugins(registry, new_gen, new_base)
    assert loaded.name == new.name
    assert f"left out {old.name} (rebased)" in caplog.text  # never merged silently
    statuses = {r["name"]: r["status"] for r in list_plugins(registry)}
    assert statuses == {old.name: "rebased", new.name: "active"}


def test_a_format_1_registry_still_loads(tmp_path, site_c_plugin, base):
    gen = load_generator(base)
    registry = tmp_path / "reg"
    plugin = add_plugin(registry, site_c_plugin, gen, base)
    index = read_json(registry / "registry.json")
    old_style = {k: index[k] for k in ("kind", "format_version", "base_generator_sha256")}
    (registry / "registry.json").write_text(json.dumps(old_style))
    (loaded,) = load_plugins(registry, gen, base)
    assert loaded.name == plugin.name
    stray = registry / "unlisted"
    stray.mkdir()
    (stray / "plugin.json").write_text((site_c_plugin / "plugin.json").read_text())
    (registry / "registry.json").write_text(json.dumps(index))  # format 2 lists its plugins
    with pytest.raises(PluginError, match="not in registry.json: \\['unlisted'\\]"):
        load_plugins(registry, gen, base)


def test_a_failed_index_write_leaves_no_unlisted_folder(tmp_path, site_c_plugin, base, monkeypatch):
    from synthct.plugins import registry as registry_module

    gen = load_generator(base)
    registry = tmp_path / "reg"

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(registry_module, "_write_index", disk_full)
    with pytest.raises(OSError, match="No space left"):
        add_plugin(registry, site_c_plugin, gen, base)
    assert not [p for p in registry.iterdir() if p.is_dir()]  # nothing half-registered
    monkeypatch.undo()
    (loaded,) = [add_plugin(registry, site_c_plugin, gen, base)]  # and a retry succeeds
    assert load_plugins(registry, gen, base)[0].name == loaded.name


def test_a_plugin_without_a_gate_decision_is_named_when_merged(
    tmp_path, site_c_plugin, base, caplog
):
    gen = load_generator(base)
    registry = tmp_path / "reg"
    plugin = add_plugin(registry, site_c_plugin, gen, base)  # no acceptance recorded at all
    with caplog.at_level(logging.INFO, logger="synthct.plugins.registry"):
        load_plugins(registry, gen, base)
    (record,) = [r for r in caplog.records if "not judged by the gate" in r.getMessage()]
    assert record.levelno == logging.WARNING  # provenance unknown: a warning
    assert f"{plugin.name} (no acceptance recorded)" in record.getMessage()
    (row,) = list_plugins(registry)
    assert row["gated"] is False
    # a gated one merges without a word about it
    gated = tmp_path / "gated"
    add_plugin(gated, site_c_plugin, gen, base, acceptance={"gated": True, "accepted": True})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="synthct.plugins.registry"):
        load_plugins(gated, gen, base)
    assert "not judged by the gate" not in caplog.text
    assert list_plugins(gated)[0]["gated"] is True
