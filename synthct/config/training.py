"""Configuration of training: the central schedule, federated rounds, faults, differential
privacy and secure aggregation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from synthct.config.base import _Strict


class TrainConfig(_Strict):
    """Centralised training schedule (federated runs split these steps over rounds)."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(default=4, ge=1)
    ae_steps: int = Field(default=1500, ge=0)
    ae_lr: float = Field(default=3e-4, gt=0)
    decoder_lr: float = Field(
        default=1e-4,
        gt=0,
        description="decoder phase (refining a trained decoder): at 3e-4 a site-styled decoder "
        "matched 2-3 of 4 sites' style, at 1e-4 all 4 in every run "
        "(bench/results/site_decoder_probe_adversarial_2026-12-02.txt)",
    )
    decoder_steps: int = Field(
        default=0,
        ge=0,
        description="central decoder phase after the autoencoder (encoder frozen): site style "
        "and the adversarial term train here (federated: decoder_rounds x local steps)",
    )
    diffusion_steps: int = Field(default=3000, ge=0)
    diffusion_lr: float = Field(default=3e-4, gt=0)
    balanced: bool = Field(
        default=True, description="sample classes uniformly so rare ones are seen"
    )
    ae_patch: tuple[int, int, int] | None = Field(
        default=None,
        description="train the autoencoder (and the decoder phase) on random patches of this "
        "many voxels, one location per batch, instead of whole volumes: the memory of large "
        "volumes; a multiple of the autoencoder's downsampling, at most data.shape",
    )
    checkpoint_every: int = Field(default=250, ge=1)
    budget_min: float | None = Field(default=None, gt=0, description="stop a phase after this")
    reference_epochs: int = Field(default=40, ge=1)


class FaultConfig(_Strict):
    """Injected failure (tests and drills): ``site`` errors or stalls in one round."""

    site: str
    phase: Literal["autoencoder", "decoder", "diffusion"] = "autoencoder"
    round: int = Field(ge=1)
    kind: Literal["error", "delay", "nan", "huge"] = Field(
        default="error",
        description="error: the site fails; delay: it stalls delay_s; nan / huge: it sends a "
        "broken or hostile update (NaN values / weights scaled 1000x) that the server must reject",
    )
    delay_s: float = Field(default=0.0, ge=0)


class DPConfig(_Strict):
    """Central DP on the generator's phases (Flower's server-side fixed clipping wrapper) and,
    when listed, the classifiers' FedAvg (``fed/dp.py``):
    each site's update is clipped to ``clipping_norm`` and Gaussian noise of std
    ``noise_multiplier * clipping_norm / n_sites`` is added to the uniform mean. One RDP
    accountant composes every noised release of the run, whatever its phase, so the
    generator carries one (epsilon, delta) per site. FedAvg only (Flower's accountant)."""

    enabled: bool = False
    noise_multiplier: float = Field(default=1.0, gt=0)
    clipping_norm: float = Field(default=1.0, gt=0)
    target_delta: float = Field(default=1e-3, gt=0, lt=1)
    phases: list[Literal["autoencoder", "decoder", "diffusion", "reference", "downstream"]] = Field(
        default_factory=lambda: ["autoencoder", "decoder", "diffusion"],
        min_length=1,
        description="the phases whose updates are clipped and noised; a phase left out "
        "releases its updates without noise and the recorded epsilon does not cover it. "
        "The classifiers (reference, downstream) each keep their own account, recorded "
        "with the reference model and in the downstream results",
    )


class SecAggClipNorms(_Strict):
    """L2 bound of one site's update per round and phase, applied on the site under SecAgg+
    (the server cannot see an update to screen it). Set above an honest site's usual update
    norm (each round's log records every site's norm before clipping) and as low as that
    allows: the quantisation step grows with it."""

    # defaults ~2.5x the largest honest round-1 norm on the demo config (autoencoder 1.12,
    # decoder 0.67, diffusion 4.05: bench/results/secagg_cost_2026-12-03.json); the
    # classifiers' norms are not measured yet
    autoencoder: float = Field(default=3.0, gt=0)
    decoder: float = Field(default=2.0, gt=0)
    diffusion: float = Field(default=10.0, gt=0)
    reference: float = Field(default=5.0, gt=0)
    downstream: float = Field(default=5.0, gt=0)


class SecAggConfig(_Strict):
    """Flower's SecAgg+ for every aggregation of model updates (generator phases, reference
    and downstream classifiers): each site sends its update (weights minus the global ones)
    masked and quantised; the server learns only the case-weighted mean. Replaces the server's per-site norm screening by clipping on the sites. With
    ``privacy.enabled`` the diffusion phase's updates are clipped to ``privacy.clipping_norm``
    with equal weights and the server adds the noise to the secure mean."""

    enabled: bool = False
    clip_norm: SecAggClipNorms = SecAggClipNorms()
    max_weight: int = Field(
        default=256,
        gt=0,
        description="at least the largest site's train cases (a site with more refuses); "
        "the protocol weighs site i by cases_i / max_weight, so keep it near the largest "
        "site: the mean's quantisation error grows with max_weight / total cases",
    )
    quantization_range: int = Field(
        default=2**24,
        gt=0,
        description="quantisation levels per element over [-clip, clip]; sites x this must "
        "stay below 2^32",
    )
    min_replies: int = Field(
        default=2, ge=2, description="fewest sites whose masked updates still aggregate"
    )


class FederatedConfig(_Strict):
    """Flower training: rounds per phase, local steps per round, strategy, robustness."""

    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = Field(default=0.01, ge=0, description="FedProx mu")
    min_class_cases: int = Field(
        default=5,
        ge=1,
        description="federated gate and reference: a site sends no statistics (nor holdout "
        "confusion counts) on a class it holds fewer cases of (train + holdout); the class "
        "is reported as not evaluated there",
    )
    ae_rounds: int = Field(default=20, ge=0)
    diffusion_rounds: int = Field(default=30, ge=0)
    local_steps_ae: int = Field(default=50, ge=0)
    local_steps_diffusion: int = Field(default=125, ge=0)
    decoder_rounds: int = Field(
        default=0,
        ge=0,
        description="decoder-only rounds after the autoencoder phase: the encoder stays frozen, "
        "so latents and any trained UNet stay valid",
    )
    local_steps_decoder: int = Field(default=100, ge=0)
    site_calibration_rounds: int = Field(
        default=0,
        ge=0,
        description="site-conditioned UNets: rounds after the diffusion rounds in which each "
        "site trains only its own site-embedding row, against the frozen EMA UNet that "
        "samples. In FedAvg a site's local steps move the shared weights toward its own "
        "scanner, so its row need not carry the style, and averaging then removes what the "
        "shared weights had learnt (docs/benchmarks.md, 'Site rows calibrated')",
    )
    site_calibration_lr: float = Field(default=1e-3, gt=0)
    finetune_rounds: int = Field(
        default=2, ge=0, description="diffusion rounds when fine-tuning a pretrained generator"
    )
    restart_unet: bool = Field(
        default=False,
        description="continuing an initial generator: keep its autoencoder, train the UNet from "
        "scratch (its EMA warms up anew; its widths must still match the initial's). Trained "
        "centrally with the site condition from its first step, a UNet carried each scanner's "
        "style where a class-only one adopted and continued federatedly did not "
        "(docs/benchmarks.md, 'A site-conditioned UNet trained from the start'); ignored "
        "without an initial generator, whose UNet starts from scratch anyway",
    )
    reference_rounds: int = Field(
        default=10, ge=1, description="FedAvg rounds of the federated reference classifier"
    )
    local_epochs_reference: int = Field(default=12, ge=1)
    min_sites: int = Field(default=2, ge=1, description="fewest replies that still aggregate")
    round_timeout_s: float = Field(default=1800.0, gt=0)
    connect_timeout_s: float = Field(default=120.0, gt=0)
    client_cpus: int = Field(default=1, ge=1, description="CPUs per simulated site")
    num_gpus: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of a GPU each simulated site reserves (0.25: four sites per GPU); "
        "0 keeps the sites on the CPU. Needs a CUDA GPU; train.device picks the device",
    )
    keep_optimizer_state: bool = Field(
        default=True,
        description="each site keeps its AdamW moments between rounds on its own disk",
    )
    reject_norm_ratio: float = Field(
        default=10.0,
        ge=0,
        description="reject a site's update whose distance from the global weights exceeds "
        "this many times the median of the other sites' (0: off); NaN/Inf updates are always "
        "rejected. The round goes on with the rest and the log names the site",
    )
    privacy: DPConfig = DPConfig()
    secagg: SecAggConfig = SecAggConfig()
    faults: list[FaultConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _dp_needs_fedavg(self) -> FederatedConfig:
        if self.privacy.enabled and self.strategy != "fedavg":
            raise ValueError(
                "privacy.enabled needs strategy fedavg: Flower's privacy accountant covers "
                "plain FedAvg only, so a FedProx run would have no epsilon"
            )
        return self

    def dp_phase(self, phase: str) -> bool:
        """Whether ``phase``'s updates are clipped and noised."""
        return self.privacy.enabled and phase in self.privacy.phases

    def finetune_schedule(self) -> FederatedConfig:
        """This schedule for fine-tuning a pretrained generator: ``finetune_rounds`` diffusion
        rounds, the autoencoder left as shipped."""
        return self.model_copy(
            update={"ae_rounds": 0, "decoder_rounds": 0, "diffusion_rounds": self.finetune_rounds}
        )
