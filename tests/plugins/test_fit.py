"""Fitted merge weights: planted weightings are recovered, a fit never ends worse than the
default, and the CLI fits on a manifest's train cases."""

from __future__ import annotations

import pytest
import torch

from synthct.checkpoint import load_generator
from synthct.cli import main
from synthct.plugins.fit import (
    ValidationDraws,
    fit_fusion_weights,
    fit_mixture_weights,
    validation_draws,
)
from synthct.plugins.merge import MixtureDenoiser, fuse


def _draws(gen, config, n: int = 16, seed: int = 0) -> ValidationDraws:
    """Random noised latents, timesteps and labels; targets filled in by each test."""
    g = torch.Generator().manual_seed(seed)
    z_t = torch.randn(n, *config.latent_shape, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    labels = torch.arange(n) % config.labels.num_classes
    return ValidationDraws(
        z_t=z_t, t=t, labels=labels, target=torch.zeros_like(z_t), conditions=labels
    )


@pytest.fixture
def setting(base, smoke_config, random_plugin):
    gen = load_generator(base)
    cfg = smoke_config.plugins
    plugins = [
        random_plugin(gen, cfg, {"nodule": 10, "normal": 10}, 1, scale=0.3),
        random_plugin(gen, cfg, {"consolidation": 10, "normal": 10}, 2, scale=0.3),
    ]
    return gen, plugins, _draws(gen, smoke_config)


def _predict(unet, draws: ValidationDraws) -> torch.Tensor:
    with torch.no_grad():
        return unet.eval()(draws.z_t, draws.t, class_labels=draws.labels)


def test_fusion_fit_recovers_planted_weights(setting):
    gen, plugins, draws = setting
    planted = torch.tensor([0.9, 0.1])
    draws.target = _predict(fuse(gen, plugins, planted.tolist()).ema, draws)
    fit = fit_fusion_weights(gen, plugins, draws, steps=80, lr=0.05)
    assert not fit.kept_default
    assert fit.loss_fitted < 0.2 * fit.loss_default  # case counts give 0.5 / 0.5
    assert (fit.weights - planted).abs().max() < 0.1
    assert fit.loss_base > fit.loss_default


def test_fusion_fit_keeps_default_when_it_is_already_best(setting):
    gen, plugins, draws = setting
    draws.target = _predict(fuse(gen, plugins).ema, draws)  # case-count weights are exact
    fit = fit_fusion_weights(gen, plugins, draws, steps=10, lr=0.2)
    assert fit.kept_default
    assert torch.allclose(fit.weights, torch.tensor([0.5, 0.5]))
    assert fit.loss_fitted == fit.loss_default < 1e-8


def test_mixture_fit_routes_each_class_to_the_plugin_that_predicts_it(setting, smoke_config):
    gen, plugins, draws = setting
    classes = smoke_config.labels.classes
    nodule, consolidation = classes.index("nodule"), classes.index("consolidation")
    normal = classes.index("normal")
    # plant the opposite of coverage: nodule is led by plugin 2, consolidation by plugin 1;
    # "normal" (both saw it: coverage says 0.5 / 0.5) is best left to the base UNet
    planted = MixtureDenoiser(gen, plugins).weights.clone()
    planted[nodule] = torch.tensor([0.0, 1.0], dtype=planted.dtype)
    planted[consolidation] = torch.tensor([1.0, 0.0], dtype=planted.dtype)
    planted[normal] = 0.0
    mixture = MixtureDenoiser(gen, plugins, planted)
    with torch.no_grad():
        draws.target = mixture(draws.z_t, draws.t, draws.labels, draws.labels)
    fit = fit_mixture_weights(gen, plugins, draws)
    assert not fit.kept_default
    assert torch.allclose(fit.weights[nodule], planted[nodule], atol=0.02)
    assert torch.allclose(fit.weights[consolidation], planted[consolidation], atol=0.02)
    assert fit.weights[normal].sum() < 0.02  # the base UNet answers "normal" again
    assert fit.loss_fitted < 1e-3 * fit.loss_default
    assert set(fit.per_class) == set(classes)
    assert fit.weights.sum(1)[: len(classes)].max() <= 1 + 1e-9


def test_validation_draws_are_fixed_by_the_seed(base, smoke_sites, smoke_config):
    from synthct.data.dataset import load_cases

    gen = load_generator(base)
    cases = load_cases(smoke_sites, smoke_config, sites=["site_a"])
    a = validation_draws(gen, cases, draws_per_case=2, seed=3)
    b = validation_draws(gen, cases, draws_per_case=2, seed=3)
    assert len(a) == 2 * len(cases.labels)
    assert torch.equal(a.z_t, b.z_t) and torch.equal(a.t, b.t)
    assert torch.equal(a.labels, cases.labels.repeat_interleave(2))


def test_cli_fits_weights_on_a_manifest(tmp_path, base, smoke_sites, capsys):
    registry = tmp_path / "reg"
    for site in ("site_a", "site_c"):
        plugin = tmp_path / site
        args = [
            "plugin",
            "train",
            "--generator",
            str(base),
            "--site",
            site,
            "--data",
            str(smoke_sites),
        ]
        assert main([*args, "--out", str(plugin), "--steps", "2"]) == 0
        add = ["plugin", "add", str(registry), str(plugin), "--generator", str(base)]
        assert main([*add, "--ungated"]) == 0
    sample = ["sample", "--generator", str(base), "--label", "nodule", "--n", "1", "--steps", "2"]
    for merge in ("fusion", "mixture"):
        out = tmp_path / merge
        with_plugins = ["--plugins", str(registry), "--merge", merge]
        assert (
            main([*sample, "--out", str(out), *with_plugins, "--fit-weights", str(smoke_sites)])
            == 0
        )
        assert len(list(out.glob("*.nii.gz"))) == 1
    capsys.readouterr()
    assert main([*sample, "--out", str(tmp_path / "x"), "--fit-weights", str(smoke_sites)]) == 2
    assert "--fit-weights needs --plugins" in capsys.readouterr().err
