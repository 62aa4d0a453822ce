"""The reference stage the CLI and the demo share: trained on real ``train`` cases, saved."""

from __future__ import annotations

from synthct.cli import main
from synthct.config import packaged_config_path
from synthct.pipeline.reference import build_reference
from synthct.reference import load_reference


def test_a_central_reference_is_saved_with_its_holdout_score(tmp_path, smoke_config, smoke_sites):
    seen = []
    model = build_reference(
        smoke_config,
        smoke_sites,
        tmp_path / "reference",
        federated=False,
        seed=3,
        progress=lambda done, total, **_: seen.append((done, total)),
    )
    assert seen and seen[-1][0] == seen[-1][1]  # every epoch reported
    loaded = load_reference(
        tmp_path / "reference", vocabulary_hash=smoke_config.labels.vocabulary_hash
    )
    assert loaded.info["holdout"] == model.info["holdout"] and loaded.info["trained"] == "central"
    assert loaded.info["weights_sha256"]  # saved with its hash
    assert not (tmp_path / "reference" / "federated").exists()  # pooled: no Flower run


def test_the_cli_trains_the_central_reference_through_the_stage(tmp_path, smoke_sites, capsys):
    out = tmp_path / "cli_reference"
    args = ["reference", "--config", str(packaged_config_path("smoke")), "--data", str(smoke_sites)]
    assert main([*args, "--out", str(out)]) == 0
    assert (out / "reference.safetensors").is_file()
    assert "reference (central)" in capsys.readouterr().out


def test_the_shipped_reference_serves_the_phantoms_it_was_trained_on(
    tmp_path, demo_config, demo_sites
):
    from synthct.pipeline.reference import reference_for_sites
    from synthct.pretrained import phantom_dir, shipped_reference_for

    assert shipped_reference_for(demo_sites) == phantom_dir() / "reference"
    out = tmp_path / "reference"
    model = reference_for_sites(demo_config, demo_sites, out)
    shipped = load_reference(
        phantom_dir() / "reference", vocabulary_hash=demo_config.labels.vocabulary_hash
    )
    assert (out / "reference.json").read_bytes() == (
        phantom_dir() / "reference" / "reference.json"
    ).read_bytes()
    assert model.info == shipped.info
    (out / "marker").write_text("kept")  # a second call keeps what is there
    reference_for_sites(demo_config, demo_sites, out)
    assert (out / "marker").is_file()
