"""The generator stage the CLI and the demo share: federated or pooled training, one call."""

from __future__ import annotations

import pytest

from synthct.errors import UsageError
from synthct.pipeline.generator import federated_summary, train_generator


def test_pooled_training_writes_the_generator(tmp_path, smoke_config, smoke_sites):
    seen = []
    gen = train_generator(
        smoke_config,
        smoke_sites,
        tmp_path / "run",
        federated=False,
        progress=lambda phase, done, total, **_: seen.append(phase),
    )
    assert (tmp_path / "run" / "generator" / "config.json").is_file()
    assert {"autoencoder", "diffusion"} <= set(seen) and gen.latent_norm.scale[0] > 0


def test_federated_options_are_refused_for_pooled_training(tmp_path, smoke_config, smoke_sites):
    for option in ({"max_rounds": 2}, {"initial": tmp_path / "generator"}):
        with pytest.raises(UsageError, match="federated options"):
            train_generator(smoke_config, smoke_sites, tmp_path / "r", federated=False, **option)
    assert not (tmp_path / "r").exists()  # refused before anything is written


def test_federated_summary_reads_the_last_training_round(tmp_path):
    rounds = [
        '{"phase": "autoencoder", "round": 1, "sites": [{"site": "a", "loss": 0.5, "bytes_up": 9}]}',
        '{"phase": "scale", "round": 0, "sites": []}',
        '{"phase": "diffusion", "round": 1, "sites": [{"site": "a", "loss": 0.2, "bytes_up": 7},'
        ' {"site": "b", "loss": 0.3, "bytes_up": 8}]}',
    ]
    (tmp_path / "rounds.jsonl").write_text("\n".join(rounds) + "\n")
    assert federated_summary(tmp_path) == {
        "rounds": 2,
        "last_losses": {"a": 0.2, "b": 0.3},
        "bytes_per_round_per_site": 8,
    }
