"""Memory estimates: exact live-byte accounting, the same on meta and real tensors, and the
levers (patches, gradient checkpointing) moving it the right way."""

from __future__ import annotations

import pytest
import torch

from synthct.config import load_config
from synthct.models.memory import MIB, estimate_memory, peak_bytes


def test_live_bytes_count_what_is_alive_at_once():
    x = torch.zeros(1000)  # made before: not counted
    four_kb = 1000 * 4

    def chain():
        y = x * 2  # y alive
        z = y + 1  # y and z alive: the peak
        del y
        w = z * 3  # y freed: z and w
        return w.view(10, 100)  # a view shares w's storage: nothing new

    assert peak_bytes(chain) == 2 * four_kb


def test_meta_estimate_equals_the_same_steps_on_real_tensors(smoke_config):
    meta = estimate_memory(smoke_config)
    real = estimate_memory(smoke_config, device="cpu")
    assert [m.phase for m in meta] == [
        "autoencoder",
        "decoder",
        "diffusion",
        "sampling step",
        "decode",
    ]
    for m, r in zip(meta, real, strict=True):
        assert m.activations_mib == pytest.approx(r.activations_mib, rel=0.02), m.phase
        assert m.weights_mib == r.weights_mib and m.optimizer_mib == r.optimizer_mib
        assert m.activations_mib > 0 and m.total_mib > m.activations_mib


def test_patches_and_gradient_checkpointing_lower_the_autoencoder_step(demo_config):
    def ae_activations(config) -> float:
        return estimate_memory(config)[0].activations_mib

    whole = ae_activations(demo_config)
    train = demo_config.train.model_copy(update={"ae_patch": (16, 16, 16)})
    patched = ae_activations(demo_config.model_copy(update={"train": train}))
    assert patched < whole / 4  # an eighth of the voxels
    ae = demo_config.autoencoder.model_copy(update={"gradient_checkpointing": True})
    checkpointed = ae_activations(demo_config.model_copy(update={"autoencoder": ae}))
    assert checkpointed < 0.8 * whole


@pytest.mark.parametrize("name", ["chest64", "chest128"])
def test_clinical_configs_fit_one_gpu(name):
    rows = estimate_memory(load_config(name))
    assert max(r.total_mib for r in rows) * MIB < 16 * 2**30  # a 16 GiB card, fp32
