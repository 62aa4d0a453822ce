"""Configuration of what follows the generator: the downstream classifiers, the utility rule
and site plugins."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from synthct.config.base import _Strict
from synthct.config.data import SiteProfile


class UtilityRule(_Strict):
    """The utility rule (``synthct.eval.utility``): real + cohort may not do worse than
    real-only on ``holdout`` by more than these bands (mean paired change over seeds). Defaults
    from the seed noise of the converged central arm (docs/benchmarks.md, "The utility rule")."""

    enabled: bool = True
    loss_band: float = Field(
        default=0.03,
        ge=0,
        le=1,
        description="largest allowed increase of the holdout class-balanced loss",
    )
    balanced_accuracy_band: float = Field(
        default=0.03,
        ge=0,
        le=1,
        description="largest allowed drop of the holdout balanced accuracy",
    )


class DownstreamConfig(_Strict):
    """The downstream classifier (a small MONAI ``Classifier``) and how it is trained: centrally
    for at most ``epochs``, or federatedly (FedAvg) for at most ``rounds`` of ``local_epochs``
    per site. Every arm stops when its ``holdout`` balanced accuracy (ties: holdout loss) has
    not improved for ``patience`` epochs (``patience_rounds`` rounds) and keeps its best
    checkpoint, so an arm is
    judged converged, not after an arbitrary budget (0 trains the full budget)."""

    channels: list[int] = Field(default_factory=lambda: [8, 16, 32])
    strides: list[int] = Field(default_factory=lambda: [2, 2, 2])
    dropout: float = Field(default=0.1, ge=0, lt=1)
    epochs: int = Field(default=30, ge=1)
    rounds: int = Field(default=10, ge=1)
    local_epochs: int = Field(default=3, ge=1)
    patience: int = Field(
        default=8,
        ge=0,
        description="central and local arms: epochs without a holdout improvement before "
        "stopping; 0 = no early stopping",
    )
    patience_rounds: int = Field(
        default=5,
        ge=0,
        description="federated arms: rounds without a holdout improvement before stopping",
    )
    batch_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    lr_schedule: Literal["constant", "onecycle"] = Field(
        default="constant",
        description="central and local arms: a constant ``lr``, or one cycle over ``epochs`` "
        "peaking at ``lr`` (federated rounds keep a constant rate)",
    )
    balanced: bool = Field(
        default=False,
        description="class-balanced batches; off by default: the natural imbalance is the problem "
        "synthetic data is meant to repair",
    )
    seeds: list[int] = Field(default_factory=lambda: [0])
    keep_optimizer_state: bool = Field(
        default=False,
        description="federated arms: each site keeps its AdamW moments between rounds on its "
        "own disk (never sent) instead of restarting them every round",
    )
    utility: UtilityRule = UtilityRule()

    @model_validator(mode="after")
    def _shapes(self) -> DownstreamConfig:
        if len(self.channels) != len(self.strides) or not self.channels:
            raise ValueError("channels and strides need the same, non-zero length")
        if not self.seeds:
            raise ValueError("seeds needs at least one seed")
        return self


class PluginConfig(_Strict):
    """A site's LoRA plugin on the frozen shared diffusion UNet (peft), and optionally on the
    frozen decoder, where a scanner's style lives."""

    rank: int = Field(default=4, ge=1)
    alpha: float = Field(default=4.0, gt=0)
    targets: Literal["conv+linear", "attention+time"] = Field(
        default="conv+linear",
        description="3x3x3 convs and linear layers, or only attention and time-embedding layers",
    )
    steps: int = Field(default=300, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    decoder_rank: int = Field(
        default=0,
        ge=0,
        description="0: the plugin adapts the UNet only; > 0: also a LoRA adapter of this rank "
        "on the decoder's 3x3x3 convs, trained to reconstruct the site's own scans, so the cases "
        "made for the site decode in its scanner's style",
    )
    decoder_steps: int = Field(default=200, ge=1)
    decoder_lr: float = Field(default=1e-3, gt=0)
    late_site: SiteProfile | None = Field(
        default=None,
        description="the demo's late joiner: a hospital with its own scanner that trained "
        "nothing of the shared generator and contributes a plugin (phantoms rendered for it)",
    )
