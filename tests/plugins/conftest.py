"""Plugin fixtures: a saved smoke base generator and random (untrained) plugins on it."""

from __future__ import annotations

import copy

import pytest
import torch

from synthct.checkpoint import build_generator, save_generator
from synthct.plugins.adapter import adapter_state, attach_adapter, lora_targets
from synthct.plugins.registry import Plugin


@pytest.fixture(scope="module")
def base(tmp_path_factory, smoke_config):
    path = tmp_path_factory.mktemp("base") / "generator"
    save_generator(build_generator(smoke_config, seed=0), path)
    return path


@pytest.fixture
def random_plugin():
    """``make(gen, cfg, classes_seen, seed, scale=0.05)``: a plugin with random A and B."""

    def make(gen, cfg, seen: dict[str, int], seed: int, scale: float = 0.05) -> Plugin:
        unet = attach_adapter(copy.deepcopy(gen.ema), cfg, "x")
        g = torch.Generator().manual_seed(seed)
        state = {
            k: scale * torch.randn(v.shape, generator=g)
            for k, v in adapter_state(unet, "x").items()
        }
        meta = {
            "site": f"s{seed}",
            "rank": cfg.rank,
            "alpha": cfg.alpha,
            "targets": cfg.targets,
            "target_modules": lora_targets(gen.ema, cfg.targets),
            "classes_seen": seen,
            "weights_sha256": f"{seed:064d}",
        }
        return Plugin(meta, state, path=None)

    return make
