"""Central training on the smoke sites: checkpoints, metrics, resume, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from synthct.artifacts import read_json
from synthct.checkpoint import load_generator
from synthct.cli import main
from synthct.config import packaged_config_path
from synthct.trainer import train_central


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, smoke_config, smoke_sites):
    full = train_central(smoke_config, smoke_sites, tmp_path / "full")
    # the same run stopped after the autoencoder phase's first checkpoint, then resumed
    short = smoke_config.model_copy(
        update={"train": smoke_config.train.model_copy(update={"diffusion_steps": 3})}
    )
    train_central(short, smoke_sites, tmp_path / "part")
    resumed = train_central(smoke_config, smoke_sites, tmp_path / "part", resume=True)
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert {x["phase"] for x in lines} == {"autoencoder", "decoder", "diffusion"}
    assert (tmp_path / "full" / "reference" / "reference.json").is_file()
    assert min(load_generator(tmp_path / "full" / "generator").latent_norm.scale) > 0


@pytest.mark.slow
def test_budget_stops_each_phase_and_resumed_sessions_add_up(tmp_path, smoke_config, smoke_sites):
    run = tmp_path / "run"
    train_central(smoke_config, smoke_sites, run, budget_min=1e-6)  # spent after one step
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(x["phase"], x["step"]) for x in steps] == [
        ("autoencoder", 1),
        ("decoder", 1),
        ("diffusion", 1),
    ]
    first = json.loads((run / "train_state" / "state.json").read_text())
    assert first["phase"] == "diffusion" and first["wall_s"] > 0
    train_central(smoke_config, smoke_sites, run, resume=True)  # no budget: runs to the end
    done = json.loads((run / "train_state" / "state.json").read_text())
    assert done["phase"] == "done" and done["step"] == smoke_config.train.diffusion_steps
    assert done["wall_s"] > first["wall_s"]


@pytest.mark.slow
def test_central_decoder_phase_learns_site_style_adversarially(tmp_path, smoke_config, smoke_sites):
    """The central trainer has the federated decoder phase: encoder frozen, per-site style and
    the patch discriminator trained together; the discriminator is dropped when shipped."""
    from synthct.checkpoint import save_generator

    ae = smoke_config.autoencoder.model_copy(update={"site_style": True, "adversarial_weight": 0.1})
    config = smoke_config.model_copy(update={"autoencoder": ae})
    gen = train_central(config, smoke_sites, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    decoder_rows = [r for r in rows if r["phase"] == "decoder"]
    assert len(decoder_rows) == config.train.decoder_steps
    assert all("adversarial" in r and "discriminator" in r for r in decoder_rows)
    assert any(p.abs().sum() > 0 for p in gen.site_style.parameters())  # zero-initialised
    # its decoder renders each site: each site's scanner noise is measured against it
    assert gen.scanner_noise is not None
    assert set(gen.scanner_noise.spectra) == set(config.site_names)
    assert (tmp_path / "run" / "generator" / "training" / "discriminator.safetensors").is_file()
    save_generator(gen, tmp_path / "shipped", sampling_only=True)
    assert not (tmp_path / "shipped" / "discriminator.safetensors").exists()


@pytest.mark.slow
def test_cli_train_and_sample(tmp_path, smoke_sites):
    smoke = str(packaged_config_path("smoke"))
    run = tmp_path / "run"
    assert (
        main(
            ["train", "--config", smoke, "--data", str(smoke_sites), "--out", str(run), "--central"]
        )
        == 0
    )
    out = tmp_path / "samples"
    assert (
        main(
            ["sample", "--generator", str(run), "--label", "nodule", "--n", "2", "--out", str(out)]
        )
        == 0
    )
    assert len(list(out.glob("nodule_*.nii.gz"))) == 2
    provenance = read_json(out / "nodule_pooled_seed0.json")
    assert provenance["steps"] == 4 and len(provenance["files"]) == 2  # the smoke config's
    assert provenance["generator_sha256"] and provenance["kind"] == "synthct-samples"
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    # the same request again would overwrite: refused, nothing touched; another seed is fine
    assert main(["sample", "--generator", str(run), "--label", "nodule", "--out", str(out)]) == 2
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    args = ["sample", "--generator", str(run), "--label", "nodule", "--n", "1", "--seed", "1"]
    assert main([*args, "--out", str(out)]) == 0
    assert len(list(out.glob("nodule_*.nii.gz"))) == 3
    assert (
        main(
            ["sample", "--generator", str(run), "--label", "tumour", "--n", "1", "--out", str(out)]
        )
        == 2
    )
