"""The demo's stages on the smoke config (the full demo config runs in `./run demo`)."""

from __future__ import annotations

import pytest

from synthct.artifacts import read_json
from synthct.cli import main
from synthct.config import packaged_config_path
from synthct.demo import STAGES, TYPICAL_STAGE_S, remaining_s


@pytest.mark.slow
def test_demo_stages_on_smoke(tmp_path, render_check):
    run = tmp_path / "run"
    assert main(["demo", "--config", str(packaged_config_path("smoke")), "--out", str(run)]) == 0
    summary = read_json(run / "demo.json")
    assert tuple(summary["stages_s"]) == STAGES  # every stage ran, in order
    assert summary["generator"]["origin"] == "from scratch"  # no pretrained fits smoke nets
    assert set(summary["generator"]["last_losses"]) == {"site_a", "site_b", "site_c"}
    assert (run / "generator" / "config.json").is_file()
    assert (run / "reference" / "reference.safetensors").is_file()
    assert "holdout" in summary["reference"]
    assert summary["reference"]["trained"] == "federated"  # no shipped one fits: FedAvg, no pooling
    assert (run / "config.yaml").is_file()
    gate = read_json(run / "gate.json")
    assert gate["verdict"] in {"pass", "fail"} and summary["gate"]["verdict"] == gate["verdict"]
    assert gate["cohort"]["cases"] == summary["cohort"]["cases"] > 0
    # per-site plan: site_b lacks the rare class, so its share of the cohort includes it
    from synthct.data.manifest import read_manifest

    rows = read_manifest(run / "cohort" / "manifest.csv")
    assert any(r.site == "site_b" and r.label == "consolidation" for r in rows)
    results = read_json(run / "downstream" / "results.json")
    assert results["mode"] == "federated" and "real" in results["arms"]
    # the synthetic arm runs only behind a passing gate
    assert ("real+synthetic" in results["arms"]) == (gate["verdict"] == "pass")
    if gate["verdict"] != "pass":  # a failed gate is explained, not hidden
        assert "failed the gate" in (run / "report.html").read_text()
    # a late joiner's plugin (UNet and decoder adapters): its own phantoms, validated, fused,
    # and scored before/after against its own scans
    plugin = summary["site_plugin"]
    assert plugin["site"] == "site_d" and plugin["late_joiner"] and plugin["decoder_rank"] == 2
    late = read_manifest(run / "late_site" / "manifest.csv")
    assert {r.site for r in late} == {"site_d"} and "site_d" not in summary["generator"][
        "last_losses"
    ]
    assert (run / "plugins" / "registry" / "registry.json").is_file()
    assert 0 < plugin["plugin_bytes"] < plugin["generator_update_bytes"]
    assert set(plugin["fusion"]["per_class"]) == set(plugin["base"]["per_class"])
    for arm in ("base", "fusion"):
        assert plugin[arm]["kid_radiomics_to_site"] is not None
    # the verdict is signed with the demo's key, and downstream checked it against that key
    from synthct.signing import verify_document

    assert verify_document(gate, [run / "keys" / "gate.pub"], what="demo gate")
    assert results["gate"] is None or results["gate"]["signed_by"].endswith("gate.pub")
    # the report: per class synthetic and real montages, per-site style pairs, HU histograms,
    # curves, the gate against harm (rule values, dose-response), downstream bars, the late
    # site's own scans beside the base generator's and the plugin-fused montage
    page = (run / "report.html").read_text()
    assert "Signed (Ed25519" in page and "Privacy account per site" in page
    assert "generator: no noised release (no epsilon)" in page  # the smoke run has no DP
    seen = render_check(run / "report.html", tmp_path)
    n_syn = len({r.label for r in rows})
    assert seen["expected"] == len(seen["images"]) == n_syn + 4 + 1 + 3 + 2 + 3
    assert all(img["range"] > 50 for img in seen["images"])


def test_demo_stage_error_is_named(tmp_path, capsys):
    """A failing stage stops the demo with exit 1 and names the stage."""
    data = tmp_path / "run" / "data"
    data.mkdir(parents=True)
    (data / "site_a").write_text("a file where the site folder must go")
    assert (
        main(
            ["demo", "--config", str(packaged_config_path("smoke")), "--out", str(tmp_path / "run")]
        )
        == 1
    )
    assert "stage 'phantom sites' failed" in capsys.readouterr().err


def test_whole_run_eta_scales_the_rest_by_the_pace_so_far():
    assert set(TYPICAL_STAGE_S) == set(STAGES)
    assert remaining_s({}) is None
    first = STAGES[0]
    typical_rest = sum(TYPICAL_STAGE_S[n] for n in STAGES[1:])
    assert remaining_s({first: TYPICAL_STAGE_S[first]}) == pytest.approx(typical_rest)
    assert remaining_s({first: 2 * TYPICAL_STAGE_S[first]}) == pytest.approx(2 * typical_rest)
    assert remaining_s({n: 1.0 for n in STAGES}) == 0.0
