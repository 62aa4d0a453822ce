"""SynthctPipeline: a saved generator as one callable, with its own inference defaults."""

from __future__ import annotations

import pytest
import torch

from synthct.checkpoint import build_generator, generator_sha256, save_generator
from synthct.generator_pipeline import SynthctPipeline


@pytest.fixture()
def saved(tmp_path, smoke_config):
    gen = build_generator(smoke_config, seed=0)
    with torch.no_grad():  # an untrained UNet's zero output layer would ignore the condition
        for p in gen.ema.parameters():
            p.add_(0.01)
    return save_generator(gen, tmp_path / "generator")


def test_from_pretrained_samples_what_was_asked_reproducibly(saved, smoke_config):
    pipe = SynthctPipeline.from_pretrained(saved)
    out = pipe(["nodule", "normal"], seed=3)
    assert out.volumes.shape == (2, 1, *smoke_config.data.shape)
    assert out.labels == ["nodule", "normal"] and out.sites == [None, None]
    assert out.generator_sha256 == generator_sha256(saved)
    assert out.spacing_mm == tuple(smoke_config.data.spacing_mm)
    # the generator's own defaults, unless the call says otherwise
    assert out.inference["guidance"] == pipe.inference.guidance
    assert torch.equal(out.volumes, pipe(["nodule", "normal"], seed=3).volumes)
    other = pipe(["nodule", "normal"], seed=3, guidance=pipe.inference.guidance + 2.0)
    assert other.inference["guidance"] == pipe.inference.guidance + 2.0
    assert not torch.equal(other.volumes, out.volumes)


def test_unknown_class_is_refused(saved):
    with pytest.raises(ValueError, match="unknown class 'tumour'"):
        SynthctPipeline.from_pretrained(saved)(["tumour"])


def test_save_pretrained_keeps_what_sampling_needs(saved, tmp_path):
    pipe = SynthctPipeline.from_pretrained(saved)
    copy = pipe.save_pretrained(tmp_path / "copy")
    assert pipe.sha256 == generator_sha256(copy)
    assert not (copy / "training").exists()
    again = SynthctPipeline.from_pretrained(copy)
    assert torch.equal(
        again(["consolidation"], seed=1).volumes, pipe(["consolidation"], seed=1).volumes
    )
