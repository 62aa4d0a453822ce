"""Central differential privacy for the classifiers' FedAvg (reference, downstream): each
site's update is clipped to ``privacy.clipping_norm``, the clipped updates are averaged with
equal weights and Gaussian noise of std ``z * C / m`` (Flower's ``compute_stdv``) is added to
the mean, one RDP accountant composing every noised release of the task (all its rounds, and
for the downstream classifiers every arm and seed, since they train on the same cases).

What a site sends besides the updates (holdout counts every round, test-set probabilities at
the end) is not noised: the privacy record lists it under ``not_covered``.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.supercore.differential_privacy import compute_stdv
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from synthct.config import SynthctConfig

__all__ = ["make_accountant", "add_dp_noise", "noise_and_account", "ClassifierDP"]


def make_accountant(config: SynthctConfig, population: int | None = None) -> RdpAccountant:
    """Flower's RDP accountant over ``population`` sites (default: the configured ones), each
    taking part in every round."""
    return RdpAccountant(
        PrivacyConfig(
            target_delta=config.federated.privacy.target_delta,
            population_size=population or len(config.site_names),
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )


def add_dp_noise(
    mean: dict[str, torch.Tensor], noise_multiplier: float, clip: float, sampled: int
) -> None:
    """Flower's central DP noise (``compute_stdv``: z * C / m) on a mean update, in place."""
    std = compute_stdv(noise_multiplier, clip, sampled)
    for value in mean.values():
        value += torch.randn_like(value) * std


def noise_and_account(
    mean: dict[str, torch.Tensor],
    accountant: RdpAccountant,
    noise_multiplier: float,
    clip: float,
    replies: int,
    population: int,
) -> None:
    """Noise the equal-weight mean of ``replies`` clipped updates (in place) and compose the
    release into ``accountant``. The std is sized by the sites whose updates the mean holds,
    not those asked: after a dropout the mean of fewer updates moves more per site
    (sensitivity C / replies), and every noised release is accounted, whoever replied."""
    if replies < 1:
        raise ValueError("no update to release")
    add_dp_noise(mean, noise_multiplier, clip, replies)
    accountant.compose(
        GaussianPrivacyEvent(
            noise_multiplier=noise_multiplier, sample_size=replies, population_size=population
        )
    )


class ClassifierDP:
    """Clip, average with equal weights, noise and account one task's classifier updates."""

    def __init__(self, config: SynthctConfig, phase: str, not_covered: list[str]) -> None:
        """``not_covered``: what the task's sites release besides the noised updates."""
        dp = config.federated.privacy
        self.phase, self.not_covered = phase, list(not_covered)
        self.noise_multiplier, self.clipping_norm = dp.noise_multiplier, dp.clipping_norm
        self.target_delta = dp.target_delta
        self.population = len(config.site_names)
        self.accountant = make_accountant(config)
        self.releases = 0

    def clip(self, update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``update`` scaled down to L2 norm <= C over all its floating tensors."""
        norm = torch.sqrt(sum((v.double() ** 2).sum() for v in update.values()))
        scale = min(1.0, self.clipping_norm / max(float(norm), 1e-12))
        return {k: v * scale for k, v in update.items()}

    def release(
        self, sent: dict[str, torch.Tensor], states: list[dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The new global state from the sites' ``states``: ``sent`` + the noised mean of
        their clipped updates (integer buffers such as batch counters stay as sent)."""
        if not states:
            raise ValueError("no update to release")
        floats = [k for k, v in sent.items() if v.is_floating_point()]
        clipped = [self.clip({k: s[k].float() - sent[k].float() for k in floats}) for s in states]
        mean = {k: torch.stack([c[k] for c in clipped]).mean(0) for k in floats}
        self.noise_mean(mean, len(states))
        out = {k: v.clone() for k, v in sent.items()}
        for k in floats:
            out[k] = (sent[k].float() + mean[k]).to(sent[k].dtype)
        return out

    def noise_mean(self, mean: dict[str, torch.Tensor], sites: int) -> None:
        """Noise the equal-weight mean of ``sites`` clipped updates (in place; under SecAgg+
        the server sees only that mean) and account for the release."""
        noise_and_account(
            mean,
            self.accountant,
            self.noise_multiplier,
            self.clipping_norm,
            sites,
            self.population,
        )
        self.releases += 1

    def record(self) -> dict[str, Any]:
        """The task's privacy account: one (epsilon, delta) per site over every release."""
        spent = self.accountant.get_privacy_spent() if self.releases else None
        return {
            "mechanism": "central DP, Gaussian, server-side fixed clipping, RDP accountant",
            "phase": self.phase,
            "epsilon": None if spent is None else float(spent.epsilon),
            "delta": self.target_delta,
            "releases": self.releases,
            "noise_multiplier": self.noise_multiplier,
            "clipping_norm": self.clipping_norm,
            "bounds_every_update": True,  # every round of the task is noised
            "not_covered": self.not_covered,
        }
