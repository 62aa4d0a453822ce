"""Merge weights fitted on a small validation set (as MedForge does), instead of case counts.

Both fits minimise the denoising loss the plugins were trained with, on the merger's own
validation cases, with the noise and timesteps drawn **once** (common random numbers), so two
weightings are compared on exactly the same problems:

* **Fusion**: ``W = W0 + sum_i w_i * delta_i`` is differentiable in ``w``; the weights
  (``w_i = softplus(u_i) >= 0``, no sum constraint: plugins add updates, they do not
  interpolate) are found by Adam through the UNet.
* **Mixture**: per class ``c`` the mixed prediction ``sum_i pi_i(c) eps_i + pi_0(c) eps_base``
  is linear in ``pi(c)``, so each row is a small quadratic programme on the simplex (the base
  UNet is a candidate too: plugins that hurt a class can be switched off), solved exactly from
  the predictions on that class's validation draws. Classes with no validation case
  keep their coverage weights.

A fit never makes things worse on its own data: if the fitted weights do not lower the
validation loss below the default ones, the defaults are kept (and the result says so).
The validation cases count as training data under the split contract (weights are learned).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize

from synthct.checkpoint import Generator
from synthct.data.dataset import CaseSet
from synthct.models.schedulers import training_scheduler
from synthct.plugins.adapter import PluginError
from synthct.plugins.merge import MixtureDenoiser, case_weights, mixture_weights, plugin_deltas
from synthct.plugins.registry import Plugin
from synthct.training import denoising_target, encode_latents

__all__ = [
    "ValidationDraws",
    "FitResult",
    "validation_draws",
    "fit_fusion_weights",
    "fit_mixture_weights",
]

logger = logging.getLogger(__name__)


@dataclass
class ValidationDraws:
    """Fixed denoising problems: noised latents, timesteps, class labels (``conditions``: the
    UNet's conditioning indices for them, null site for a site-conditioned UNet), targets."""

    z_t: torch.Tensor
    t: torch.Tensor
    labels: torch.Tensor
    target: torch.Tensor
    conditions: torch.Tensor

    def __len__(self) -> int:
        return len(self.t)


@dataclass
class FitResult:
    """Fitted weights and the validation loss under the default and the chosen weights."""

    weights: torch.Tensor
    loss_default: float
    loss_fitted: float
    loss_base: float
    kept_default: bool
    per_class: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "weights": [round(float(w), 4) for w in self.weights.flatten()],
            "loss_base": round(self.loss_base, 5),
            "loss_default": round(self.loss_default, 5),
            "loss_fitted": round(self.loss_fitted, 5),
            "kept_default": self.kept_default,
        }


def validation_draws(
    gen: Generator, cases: CaseSet, *, draws_per_case: int = 8, seed: int = 0
) -> ValidationDraws:
    """``draws_per_case`` (noise, timestep) pairs per validation case, drawn once."""
    if len(cases.labels) == 0:
        raise PluginError("fitting merge weights needs at least one validation case")
    generator = torch.Generator().manual_seed(seed)
    scheduler = training_scheduler(gen.config.diffusion)
    with torch.no_grad():
        z0 = gen.latent_norm.apply(encode_latents(gen.autoencoder.eval(), cases.images))
    z0 = z0.repeat_interleave(draws_per_case, dim=0)
    labels = cases.labels.repeat_interleave(draws_per_case)
    noise = torch.randn(z0.shape, generator=generator)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z0),), generator=generator)
    z_t = scheduler.add_noise(z0, noise, t)
    target = denoising_target(scheduler, gen.config.diffusion, z0, noise, t)
    conditions = gen.conditioning.encode(labels)
    return ValidationDraws(z_t=z_t, t=t, labels=labels, target=target, conditions=conditions)


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def fit_fusion_weights(
    gen: Generator,
    plugins: list[Plugin],
    draws: ValidationDraws,
    *,
    steps: int = 40,
    lr: float = 0.05,
    batch_size: int = 8,
    seed: int = 0,
) -> FitResult:
    """Fusion weights ``w >= 0`` minimising the validation denoising loss of the fused UNet."""
    if not plugins:
        raise PluginError("fusion needs at least one plugin")
    unet = copy.deepcopy(gen.ema).eval().requires_grad_(False)
    base = {k: v.detach().float() for k, v in unet.state_dict().items()}
    deltas = [{k: d.float() for k, d in plugin_deltas(p, base).items()} for p in plugins]
    names = sorted(set().union(*deltas))

    def fused_loss(w: torch.Tensor, rows: slice) -> torch.Tensor:
        params = {
            n: base[n] + sum(w[i] * d[n] for i, d in enumerate(deltas) if n in d) for n in names
        }
        pred = torch.func.functional_call(
            unet, params, (draws.z_t[rows], draws.t[rows]), {"class_labels": draws.conditions[rows]}
        )
        return F.mse_loss(pred.float(), draws.target[rows].float(), reduction="sum")

    def full_loss(w: torch.Tensor) -> float:
        with torch.no_grad():
            total = sum(fused_loss(w, rows).item() for rows in _batches(len(draws), batch_size))
        return total / draws.target.numel()

    default = torch.tensor(case_weights(plugins), dtype=torch.float32)
    loss_base = full_loss(torch.zeros_like(default))
    loss_default = full_loss(default)
    u = torch.log(torch.expm1(default.clamp_min(1e-3))).requires_grad_(True)
    optimizer = torch.optim.Adam([u], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    per_value = draws.target[:1].numel()
    for _ in range(steps):
        rows = torch.randperm(len(draws), generator=generator)[:batch_size]
        optimizer.zero_grad(set_to_none=True)
        loss = fused_loss(F.softplus(u), rows) / (len(rows) * per_value)
        loss.backward()
        optimizer.step()
    fitted = F.softplus(u).detach()
    loss_fitted = full_loss(fitted)
    kept = loss_fitted >= loss_default
    logger.info(
        "fusion weights fitted on %d draws: %s (loss %.5f -> %.5f; base %.5f)%s",
        len(draws),
        [round(float(w), 3) for w in fitted],
        loss_default,
        loss_fitted,
        loss_base,
        "; no better, kept the case-count weights" if kept else "",
    )
    return FitResult(
        weights=default if kept else fitted,
        loss_default=loss_default,
        loss_fitted=min(loss_fitted, loss_default),
        loss_base=loss_base,
        kept_default=bool(kept),
    )


def _simplex_least_squares(gram: np.ndarray, cross: np.ndarray) -> np.ndarray:
    """argmin_pi  pi' G pi - 2 b' pi  subject to pi >= 0, sum(pi) = 1."""
    p = len(cross)
    result = minimize(
        lambda x: x @ gram @ x - 2 * cross @ x,
        np.full(p, 1.0 / p),
        jac=lambda x: 2 * gram @ x - 2 * cross,
        bounds=[(0.0, 1.0)] * p,
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1.0}],
        method="SLSQP",
    )
    pi = np.clip(result.x, 0.0, None)
    return pi / pi.sum()


def fit_mixture_weights(
    gen: Generator, plugins: list[Plugin], draws: ValidationDraws, *, batch_size: int = 8
) -> FitResult:
    """Per-class Mixture weights minimising each class's validation denoising loss."""
    mixture = MixtureDenoiser(gen, plugins)
    classes = gen.config.labels.classes
    default = mixture_weights(plugins, classes)

    @torch.no_grad()
    def predict(unet: torch.nn.Module) -> torch.Tensor:
        return torch.cat(
            [
                unet(draws.z_t[rows], draws.t[rows], class_labels=draws.conditions[rows]).double()
                for rows in _batches(len(draws), batch_size)
            ]
        )

    preds = [predict(expert) for expert in mixture.experts]
    base_pred = predict(mixture.base)
    # candidates: the P plugins, then the base UNet (it gets what a row leaves)
    stacked = torch.stack([p.flatten(1) for p in [*preds, base_pred]])  # (P+1) x N x D
    target = draws.target.double().flatten(1)  # N x D
    n_plugins = len(plugins)
    weights = default.clone()
    per_class: dict[str, float] = {}

    def loss_of(w: torch.Tensor, rows: torch.Tensor) -> float:
        row_w = w[draws.labels[rows]]  # n x P
        full = torch.cat([row_w, (1 - row_w.sum(1, keepdim=True)).clamp_min(0)], 1)
        mixed = torch.einsum("np,pnd->nd", full, stacked[:, rows])
        return float(((mixed - target[rows]) ** 2).sum())

    for c, name in enumerate(classes):
        rows = (draws.labels == c).nonzero().flatten()
        if len(rows) == 0:
            continue
        e = stacked[:, rows].flatten(1)  # (P+1) x (n*D)
        gram = (e @ e.T).numpy()
        cross = (e @ target[rows].flatten()).numpy()
        candidate = weights.clone()
        candidate[c] = torch.from_numpy(_simplex_least_squares(gram, cross)[:n_plugins])
        if loss_of(candidate, rows) < loss_of(weights, rows):
            weights = candidate
        per_class[name] = round(float(loss_of(weights, rows)) / (len(rows) * target.shape[1]), 5)
    all_rows = torch.arange(len(draws))
    n_values = target.numel()
    loss_default = loss_of(default, all_rows) / n_values
    loss_fitted = loss_of(weights, all_rows) / n_values
    loss_base = float(((base_pred.flatten(1) - target) ** 2).sum()) / n_values
    logger.info(
        "mixture weights fitted on %d draws (loss %.5f -> %.5f; base %.5f)",
        len(draws),
        loss_default,
        loss_fitted,
        loss_base,
    )
    return FitResult(
        weights=weights,
        loss_default=loss_default,
        loss_fitted=loss_fitted,
        loss_base=loss_base,
        kept_default=bool(torch.equal(weights, default)),
        per_class=per_class,
    )
