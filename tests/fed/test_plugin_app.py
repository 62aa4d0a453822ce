"""A site contributes its plugin through a Flower round (simulation): only the adapter and
coarsened counts leave the site, audited; the registry records the node that sent it."""

from __future__ import annotations

import json

import pytest

from synthct.artifacts import read_json
from synthct.checkpoint import build_generator, load_generator, save_generator
from synthct.cli import main
from synthct.fed.errors import FederatedError
from synthct.fed.plugin_app import contribute_plugin
from synthct.plugins.registry import load_plugins

pytestmark = pytest.mark.slow


def test_a_site_contributes_its_plugin_through_flower(tmp_path, smoke_config, smoke_sites):
    base = tmp_path / "base"
    save_generator(build_generator(smoke_config, seed=0), base)
    registry, run = tmp_path / "registry", tmp_path / "run"
    args = ["plugin", "contribute", str(registry), "--generator", str(base), "--site", "site_c"]
    args += ["--data", str(smoke_sites), "--steps", "2", "--gate-cases", "3", "--bootstrap", "20"]
    # the smoke sites hold 2-4 cases per class: the small-class guard would withhold them all
    args += ["--config", "smoke", "--set", "federated.min_class_cases=1"]
    # judged by the gate: an untrained base with a 2-step plugin makes noise, which fails;
    # the refusal and its numbers are recorded, nothing is added
    assert main([*args, "--out", str(tmp_path / "refused")]) == 3
    index = read_json(registry / "registry.json")
    assert index["plugins"] == {} and index["history"][-1]["event"] == "refused"
    decision = index["history"][-1]["decision"]
    assert decision["gated"] and not decision["accepted"] and decision["failed_rules"]
    assert decision["cohort"] == {
        "cases": 12,
        "classes": ["normal", "nodule", "ground_glass", "consolidation"],
        "site": "site_c",
    }
    # with rules that judge nothing the same contribution passes, and the decision is kept
    rules = tmp_path / "lenient.yaml"
    rules.write_text(
        "rules:\n" + "".join(f"  {r}: {{enabled: false}}\n" for r in decision["rules"])
    )
    assert main([*args, "--out", str(run), "--rules", str(rules)]) == 0
    index = read_json(registry / "registry.json")
    ((name, entry),) = index["plugins"].items()
    assert entry["site"] == "site_c" and entry["by"].startswith("flower node ")
    assert entry["acceptance"]["accepted"] and entry["acceptance"]["verdict"] == "pass"
    # every other site judged a cohort made for it by the base and one by the fused generator,
    # on its own data; nothing can be worse when no rule judges
    others = entry["acceptance"]["other_sites"]
    assert set(others) == set(smoke_config.site_names) - {"site_c"}
    assert all(o["worse"] == {} and o["plugin_verdict"] == "pass" for o in others.values())
    for other in others:
        audit = (run / "sites" / other / "audit.jsonl").read_text().splitlines()
        assert [json.loads(line)["phase"] for line in audit] == [
            "gate-summary",
            "gate-evidence",
        ] * 2
    gen = load_generator(base)
    (plugin,) = load_plugins(registry, gen, base)  # every check `plugin add` makes
    assert plugin.meta["classes_seen"]["consolidation"] == 1  # coarsened: "a few"
    # what left the site is in its own audit log: the adapter's bytes and digest, nothing else
    record, *judged = [
        json.loads(line)
        for line in (run / "sites" / "site_c" / "audit.jsonl").read_text().splitlines()
    ]
    assert plugin.decoder_state  # smoke's plugins.decoder_rank: the site's decoder adapter too
    assert record["phase"] == "plugin"
    assert record["tensors"] == len(plugin.state) + len(plugin.decoder_state)
    assert [r["phase"] for r in judged] == ["gate-summary", "gate-evidence"]  # then the gate
    assert set(record["metrics"]) == {"site-index", "contributed"} | {
        f"seen-{c}" for c in smoke_config.labels.classes
    }
    # a site outside the config, or a registry serving another base, is refused, and the
    # registry is left as it was
    with pytest.raises(FederatedError, match="'site_x' is not in the config"):
        contribute_plugin(
            smoke_config, smoke_sites, site="site_x", generator_dir=base, registry=registry,
            run=tmp_path / "x",
        )  # fmt: skip
    other = tmp_path / "other"
    save_generator(build_generator(smoke_config, seed=1), other)
    with pytest.raises(FederatedError, match="serves base generator .* no site is asked"):
        contribute_plugin(
            smoke_config, smoke_sites, site="site_a", generator_dir=other, registry=registry,
            run=tmp_path / "y", steps=1,
        )  # fmt: skip
    assert read_json(registry / "registry.json")["version"] == index["version"]
    assert not list(tmp_path.glob(".incoming-*"))  # no staging folder left behind
