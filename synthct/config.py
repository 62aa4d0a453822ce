"""Typed, validated run configuration (YAML -> pydantic).

One config object is passed whole through the data path (nanoGPT style). Every section forbids
unknown keys, so a typo fails before any work starts, with the file, the key path
(``data.sites[2].noise_hu``) and the bad value in one message.
"""

from __future__ import annotations

import copy
import hashlib
import json
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from synthct.errors import SynthctError

__all__ = [
    "ConfigError",
    "LabelConfig",
    "SiteProfile",
    "SplitFractions",
    "LesionProfile",
    "DataConfig",
    "AutoencoderConfig",
    "UNetConfig",
    "DiffusionConfig",
    "SamplingConfig",
    "TrainConfig",
    "FaultConfig",
    "DPConfig",
    "FederatedConfig",
    "SynthctConfig",
    "load_config",
    "packaged_config_path",
]

PositiveFloat = Annotated[float, Field(gt=0)]


class ConfigError(SynthctError, ValueError):
    """A configuration file failed validation; the message names file, key path and value."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelConfig(_Strict):
    """The label vocabulary: ordered class names. Index ``len(classes)`` is the null class."""

    classes: list[str] = Field(min_length=2)
    rare: list[str] = Field(default_factory=list, description="classes reported first")

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"class names must be unique, got {v}")
        for name in v:
            if not name or not name.replace("_", "").isalnum():
                raise ValueError(f"class name {name!r} must be alphanumeric/underscore")
        return v

    @model_validator(mode="after")
    def _rare_known(self) -> LabelConfig:
        unknown = [r for r in self.rare if r not in self.classes]
        if unknown:
            raise ValueError(f"rare classes {unknown} are not in classes {self.classes}")
        return self

    @property
    def vocabulary_hash(self) -> str:
        """Stable hash of the ordered vocabulary; models and plugins must agree on it."""
        blob = json.dumps(self.classes, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, name: str) -> int:
        try:
            return self.classes.index(name)
        except ValueError:
            raise KeyError(f"unknown class {name!r}; vocabulary is {self.classes}") from None


class SiteProfile(_Strict):
    """One hospital: how its scanner images and which cases it has (phantom generation).

    ``label_map`` maps the site's own label names to vocabulary classes; a real-data site needs
    only ``name`` and, if its labels differ, ``label_map``.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    counts: dict[str, Annotated[int, Field(ge=0)]] = Field(default_factory=dict)
    noise_hu: float = Field(default=15.0, ge=0, le=200)
    hu_offset: float = Field(default=0.0, ge=-200, le=200)
    blur_mm: float = Field(default=0.0, ge=0, le=30)
    slice_mm: PositiveFloat = 10.0
    fov_mm: float = Field(default=360.0, ge=150, le=700)
    orientation: Literal["RAS", "LPS"] = "RAS"
    label_map: dict[str, str] = Field(default_factory=dict)


class SplitFractions(_Strict):
    """The one split contract: train (learn), holdout (gate compares), test (downstream).

    ``test`` may be 0 when the test split is a separate balanced set (``data.test_per_class``).
    """

    train: float = Field(default=0.6, gt=0, lt=1)
    holdout: float = Field(default=0.2, gt=0, lt=1)
    test: float = Field(default=0.2, ge=0, lt=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitFractions:
        total = self.train + self.holdout + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split fractions must sum to 1, got {total:.4f}")
        return self


def _ordered(name: str, v: tuple[float, float]) -> tuple[float, float]:
    if not v[0] <= v[1]:
        raise ValueError(f"{name} must be [low, high] with low <= high, got {list(v)}")
    return v


class LesionProfile(_Strict):
    """How visible each phantom lesion is: the difficulty of the phantom benchmark.

    Each pair is a ``[low, high]`` range a case draws from uniformly. The defaults are the
    original, easy phantoms (a converged classifier scores 1.0); ``configs/demo.yaml`` sets
    subtler lesions so a real-only classifier has room to gain (see docs/benchmarks.md).
    """

    nodule_radius_mm: tuple[PositiveFloat, PositiveFloat] = (33.0, 37.0)
    nodule_hu: tuple[float, float] = (25.0, 60.0)
    ground_glass_radius_mm: tuple[PositiveFloat, PositiveFloat] = (48.0, 62.0)
    ground_glass_hu: tuple[float, float] = Field(
        default=(-600.0, -430.0), description="target HU of the haze centre (lung is -860)"
    )
    consolidation_cut: tuple[float, float] = Field(
        default=(-0.15, 0.15),
        description="the dense region is where the dependent-lung coordinate exceeds the cut "
        "(higher = a smaller region; about -0.15 is half a lung)",
    )

    @field_validator(
        "nodule_radius_mm",
        "nodule_hu",
        "ground_glass_radius_mm",
        "ground_glass_hu",
        "consolidation_cut",
    )
    @classmethod
    def _low_high(cls, v: tuple[float, float], info) -> tuple[float, float]:
        return _ordered(info.field_name, v)


class DataConfig(_Strict):
    """Geometry of model input and the sites. Spatial axes are RAS voxel order (x, y, z).

    ``test_per_class`` > 0 gives every site a balanced ``test`` split of that many phantoms per
    class (also of classes the site never has in ``train``), rendered apart from ``counts``,
    which then fill ``train`` and ``holdout`` only (``splits.test`` must be 0): rare-class
    recall per site needs more than the one or two rare test cases a fraction leaves.
    """

    shape: tuple[int, int, int] = (32, 32, 32)
    spacing_mm: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (11.0, 11.0, 10.0)
    hu_window: tuple[float, float] = (-1024.0, 1024.0)
    roi: Literal["none", "lung"] = "none"
    splits: SplitFractions = SplitFractions()
    test_per_class: int = Field(default=0, ge=0, le=1000)
    lesions: LesionProfile = LesionProfile()
    sites: list[SiteProfile] = Field(min_length=1)

    @field_validator("shape")
    @classmethod
    def _shape_ok(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        for s in v:
            if s < 16 or s % 8:
                raise ValueError(f"each size must be >= 16 and a multiple of 8, got {list(v)}")
        return v

    @field_validator("hu_window")
    @classmethod
    def _window_ok(cls, v: tuple[float, float]) -> tuple[float, float]:
        if v[0] >= v[1]:
            raise ValueError(f"hu_window must be (low, high) with low < high, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _one_test_source(self) -> DataConfig:
        if self.test_per_class > 0 and self.splits.test > 0:
            raise ValueError(
                "splits.test must be 0 when test_per_class > 0 (the balanced set is the test split)"
            )
        if self.test_per_class == 0 and self.splits.test == 0:
            raise ValueError("no test split: set splits.test > 0 or test_per_class > 0")
        return self

    @model_validator(mode="after")
    def _unique_sites(self) -> DataConfig:
        names = [s.name for s in self.sites]
        if len(set(names)) != len(names):
            raise ValueError(f"site names must be unique, got {names}")
        return self


# Fields that shape a training loss, not a network: weights trained under one value load
# under another (e.g. a continuation that adds the detail term).
_LOSS_ONLY = {
    "autoencoder": {
        "kl_weight",
        "edge_weight",
        "perceptual_weight",
        "detail_weight",
        "detail_window_hu",
        "site_style_dropout",
        "adversarial_weight",
        "discriminator_channels",
        "discriminator_layers",
        "gradient_checkpointing",
    }
}


class AutoencoderConfig(_Strict):
    """MONAI ``AutoencoderKL`` (3D). ``len(channels) - 1`` halvings per axis (3 levels = 4x)."""

    channels: tuple[int, ...] = (16, 32, 32)
    num_res_blocks: int = Field(default=1, ge=1, le=4)
    latent_channels: int = Field(default=4, ge=1, le=16)
    norm_num_groups: int = Field(default=8, ge=1)
    attention: bool = False
    kl_weight: float = Field(default=1e-6, ge=0)
    edge_weight: float = Field(default=0.5, ge=0, description="gradient-difference loss weight")
    perceptual_weight: float = Field(
        default=0.0, ge=0, description="feature loss through the frozen reference encoder"
    )
    detail_weight: float = Field(
        default=0.0,
        ge=0,
        description="extra L1 inside detail_window_hu (lung parenchyma): subtle haze is a small "
        "error in the full window and the decoder attenuates it unless it costs more",
    )
    detail_window_hu: tuple[float, float] = (-1000.0, -300.0)
    site_style: bool = Field(
        default=False,
        description="tell the decoder the site (scanner): a per-site feature bias and output "
        "gain/offset, trained in the decoder phase (data.sites is the site vocabulary)",
    )
    spare_site_slots: int = Field(
        default=1, ge=0, description="site style rows reserved for sites that join later"
    )
    site_style_dropout: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="share of decoder-phase cases decoded with the null site, so site-agnostic "
        "decoding stays a valid average style",
    )

    adversarial_weight: float = Field(
        default=0.0,
        ge=0,
        description="weight of the least-squares patch-adversarial term in the decoder phase "
        "(MONAI PatchDiscriminator + PatchAdversarialLoss, as MONAI's latent-diffusion "
        "tutorials and MAISI train their autoencoders): scanner texture that L1 averages away",
    )
    discriminator_channels: int = Field(default=16, ge=4, description="first layer's channels")
    discriminator_layers: int = Field(default=2, ge=1, le=4, description="strided layers")
    gradient_checkpointing: bool = Field(
        default=False,
        description="recompute the autoencoder's blocks in the backward pass (MONAI "
        "AutoencoderKL use_checkpoint): less activation memory for large volumes, more time",
    )

    @model_validator(mode="after")
    def _groups_divide(self) -> AutoencoderConfig:
        for c in self.channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"channels {list(self.channels)} must be multiples of norm_num_groups"
                )
        return self

    @model_validator(mode="after")
    def _detail_window_ordered(self) -> AutoencoderConfig:
        low, high = self.detail_window_hu
        if not low < high:
            raise ValueError(f"detail_window_hu {list(self.detail_window_hu)} must be [low, high]")
        return self

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channels) - 1)


class UNetConfig(_Strict):
    """MONAI ``DiffusionModelUNet`` on latents, conditioned through class embeddings."""

    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, True, True)
    num_res_blocks: int = Field(default=1, ge=1, le=4)
    num_head_channels: int = Field(default=16, ge=1)
    norm_num_groups: int = Field(default=8, ge=1)
    spare_class_slots: int = Field(
        default=1, ge=0, description="embeddings reserved for new classes"
    )
    site_conditioning: bool = Field(
        default=False,
        description="condition on the site (scanner) beside the class: a class embedding and a "
        "site embedding, summed, each with a null entry (data.sites is the site vocabulary)",
    )
    spare_site_slots: int = Field(
        default=1, ge=0, description="site embeddings reserved for sites that join later"
    )

    @model_validator(mode="after")
    def _levels_match(self) -> UNetConfig:
        if len(self.attention_levels) != len(self.channels):
            raise ValueError("attention_levels must have one entry per channels level")
        return self


class DiffusionConfig(_Strict):
    """Noise schedule (diffusers names) and conditioning used in training and sampling."""

    num_train_timesteps: int = Field(default=1000, ge=10)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = Field(default=0.0015, gt=0, lt=1)
    beta_end: float = Field(default=0.0195, gt=0, lt=1)
    prediction_type: Literal["epsilon", "v_prediction"] = "v_prediction"
    zero_terminal_snr: bool = Field(
        default=False,
        description="rescale the betas so the last timestep is pure noise (Lin et al. 2024, "
        "diffusers' rescale_betas_zero_snr) and sample from it ('trailing' timesteps). "
        "Without it the scaled-linear schedule leaves 1.2 % of the signal at t = T, which a "
        "3D latent's low frequencies can still carry. Measured on the demo (one seed, "
        "docs/benchmarks.md): HU/texture fidelity closer, samples no more varied. Needs "
        "v_prediction",
    )
    p_uncond: float = Field(default=0.15, ge=0, lt=1, description="label dropout for CFG")
    p_site_uncond: float = Field(
        default=0.15,
        ge=0,
        lt=1,
        description="site dropout (site-conditioned UNets): teaches "
        "the null site, used for site-agnostic cases and sites the generator never saw",
    )
    ema_decay: float = Field(default=0.999, ge=0, lt=1)
    latent_norm: Literal["global", "per_channel"] = Field(
        default="global",
        description="the UNet's latent space: one 1/std (LDM) or each channel's mean and "
        "1/std (EDM2); see synthct.models.latent_norm",
    )

    @model_validator(mode="after")
    def _zero_snr_needs_v(self) -> DiffusionConfig:
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError(
                "diffusion.zero_terminal_snr needs prediction_type v_prediction "
                "(epsilon prediction cannot recover the sample where alpha is 0, at t = T)"
            )
        return self


SamplerName = Literal["dpmpp", "dpmpp_sde", "euler_a", "unipc", "ddim", "ddpm"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)


class SamplingConfig(_Strict):
    """A generator's inference settings (saved with it; command-line values override)."""

    sampler: SamplerName = "dpmpp"
    steps: int = Field(default=15, ge=1, le=1000)
    guidance: float = Field(default=3.0, ge=0)
    class_guidance: dict[str, float] = Field(
        default_factory=dict,
        description="guidance per class name, for classes whose samples come closest to real "
        "at another scale than `guidance` (chosen on holdout: bench/class_guidance.py); "
        "classes not named use `guidance`, and a command-line --guidance applies to all",
    )
    guidance_interval: tuple[float, float] = Field(
        default=(0.0, 1.0),
        description="noise levels t/T where guidance applies; elsewhere the conditional "
        "prediction alone (Kynkaanniemi et al. 2024: guidance at high noise collapses variety)",
    )
    site_guidance: bool = Field(
        default=False,
        description="site-conditioned UNets: guidance amplifies the site as well as the class "
        "(the unconditional branch drops both); off, the site stays on in both branches",
    )
    batch_size: int = Field(default=8, ge=1)
    decode_patch: int | None = Field(
        default=None,
        ge=4,
        description="latent window for sliding-window decoding (bounded memory). The decoder's "
        "GroupNorm sees one window's statistics, so small windows drift: on the shipped "
        "autoencoder, windows of 12 of 16 latents differ from the whole decode by 17 HU on "
        "average, windows of 8 by 86 HU (tests/test_checkpoint_sampling.py); keep it >= 3/4 "
        "of the latent grid",
    )

    @model_validator(mode="after")
    def _interval_ordered(self) -> SamplingConfig:
        low, high = self.guidance_interval
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(
                f"guidance_interval {list(self.guidance_interval)} must be 0 <= low < high <= 1"
            )
        return self


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
        description="federated gate: a site sends no statistics on a class it holds fewer "
        "cases of (train + holdout); the gate reports the class as not evaluated there",
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


class SynthctConfig(_Strict):
    """A whole run: labels, data and the later stages' sections."""

    seed: int = Field(default=0, ge=0)
    labels: LabelConfig
    data: DataConfig
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    unet: UNetConfig = UNetConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    sampling: SamplingConfig = SamplingConfig()
    train: TrainConfig = TrainConfig()
    federated: FederatedConfig = FederatedConfig()
    downstream: DownstreamConfig = DownstreamConfig()
    plugins: PluginConfig = PluginConfig()

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """C×X×Y×Z of the latent grid."""
        f = self.autoencoder.downsample
        return (self.autoencoder.latent_channels, *(s // f for s in self.data.shape))

    @model_validator(mode="after")
    def _late_site_is_new(self) -> SynthctConfig:
        late = self.plugins.late_site
        if late is not None and late.name in self.site_names:
            raise _LocatedError(
                ("plugins", "late_site", "name"),
                late.name,
                "the late site must be a site that did not train the generator "
                f"(not one of data.sites: {self.site_names})",
            )
        return self

    @model_validator(mode="after")
    def _patch_fits(self) -> SynthctConfig:
        patch = self.train.ae_patch
        if patch is None:
            return self
        f = self.autoencoder.downsample
        if any(p > s or p % f for p, s in zip(patch, self.data.shape, strict=True)):
            raise _LocatedError(
                ("train", "ae_patch"),
                list(patch),
                f"patches must fit data.shape {list(self.data.shape)} and be multiples of the "
                f"autoencoder's downsampling ({f})",
            )
        return self

    @model_validator(mode="after")
    def _labels_known(self) -> SynthctConfig:
        classes = set(self.labels.classes)
        for i, site in enumerate(self.data.sites):
            for name in site.counts:
                if name not in classes:
                    raise _LocatedError(
                        ("data", "sites", i, "counts", name),
                        name,
                        f"unknown class {name!r} (vocabulary: {self.labels.classes})",
                    )
            for local, target in site.label_map.items():
                if target not in classes:
                    raise _LocatedError(
                        ("data", "sites", i, "label_map", local),
                        target,
                        f"maps to unknown class {target!r} (vocabulary: {self.labels.classes})",
                    )
        for name, scale in self.sampling.class_guidance.items():
            if name not in classes:
                raise _LocatedError(
                    ("sampling", "class_guidance", name),
                    name,
                    f"unknown class {name!r} (vocabulary: {self.labels.classes})",
                )
            if scale < 0:
                raise _LocatedError(
                    ("sampling", "class_guidance", name), scale, "guidance must be >= 0"
                )
        for i, fault in enumerate(self.federated.faults):
            if fault.site not in self.site_names:
                raise _LocatedError(
                    ("federated", "faults", i, "site"),
                    fault.site,
                    f"unknown site (configured: {self.site_names})",
                )
        return self

    def network_mismatch(self, other: SynthctConfig) -> str | None:
        """Why weights trained under ``other`` cannot be used under this config, or None:
        networks, label vocabulary, noise schedule and volume shape must be identical."""
        for section in ("labels", "autoencoder", "unet", "diffusion"):
            loss_only = _LOSS_ONLY.get(section, set())
            mine = getattr(self, section).model_dump(exclude=loss_only)
            if mine != getattr(other, section).model_dump(exclude=loss_only):
                return f"the {section!r} sections differ"
        if self.data.shape != other.data.shape:
            return f"volume shape {other.data.shape} != {self.data.shape}"
        site_aware = self.unet.site_conditioning or self.autoencoder.site_style
        if site_aware and self.site_names != other.site_names:
            return f"site vocabulary {other.site_names} != {self.site_names}"
        return None

    def site(self, name: str) -> SiteProfile:
        for s in self.data.sites:
            if s.name == name:
                return s
        raise KeyError(f"unknown site {name!r}; configured sites: {self.site_names}")

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.data.sites]

    def resolve_label(self, site: str, raw: str) -> str:
        """Map a site's own label to a vocabulary class; an unmapped label is an error."""
        profile = next((s for s in self.data.sites if s.name == site), None)
        if profile is not None and raw in profile.label_map:
            return profile.label_map[raw]
        if raw in self.labels.classes:
            return raw
        raise KeyError(
            f"site {site!r}: label {raw!r} is neither a class {self.labels.classes} "
            f"nor mapped in data.sites[{site}].label_map"
        )


class _LocatedError(ValueError):
    """Raised inside validators to report a precise key path."""

    def __init__(self, loc: tuple[Any, ...], value: Any, message: str) -> None:
        super().__init__(message)
        self.loc, self.value, self.message = loc, value, message


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def _lookup(document: Any, loc: tuple[Any, ...]) -> Any:
    node = document
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return "<missing>"
    return node


PACKAGED_CONFIGS = ("demo", "smoke", "chest64", "chest128")  # chest*: GPU scale


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file path, or a packaged config's name (``demo``, ``smoke``)."""
    path = Path(name_or_path)
    if not path.exists() and str(name_or_path) in PACKAGED_CONFIGS:
        return packaged_config_path(str(name_or_path))
    return path


def apply_overrides(document: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """``key.path=value`` items (values in YAML syntax) applied onto a config document; the
    result is validated like the file itself, so a bad key or value is named the same way."""
    out = copy.deepcopy(document)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. train.batch_size=2")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section in {source}")
            node = child
        node[parts[-1]] = value
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> SynthctConfig:
    """Read and validate a YAML config (a path or a packaged name), with ``--set``-style
    ``overrides``; raise :class:`ConfigError` naming file, key and value."""
    path = resolve_config_path(path)
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = ", ".join(PACKAGED_CONFIGS)
        raise ConfigError(f"{path}: config file not found (packaged names: {known})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(document).__name__}")
    source = str(path)
    if overrides:
        document = apply_overrides(document, overrides, source)
        source += " with --set " + " ".join(overrides)
    return config_from_dict(document, source=source)


def config_from_dict(document: dict[str, Any], *, source: str = "<dict>") -> SynthctConfig:
    try:
        return SynthctConfig.model_validate(document)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            ctx_error = (err.get("ctx") or {}).get("error")
            if isinstance(ctx_error, _LocatedError):
                loc, value, msg = ctx_error.loc, ctx_error.value, ctx_error.message
            else:
                loc = tuple(p for p in err["loc"] if p not in ("function-after",))
                value = _lookup(document, loc) if err["type"] != "missing" else "<missing>"
                msg = err["msg"].removeprefix("Value error, ")
                if err["type"] == "extra_forbidden":
                    msg = "unknown key"
            problems.append(f"{_format_loc(loc)} = {value!r}: {msg}")
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(problems)) from None


def packaged_config_path(name: str) -> Path:
    """Path of a config shipped inside the package (``demo``, ``smoke``)."""
    resource = files("synthct.configs") / f"{name}.yaml"
    path = Path(str(resource))
    if not path.is_file():
        raise ConfigError(f"no packaged config named {name!r} ({path})")
    return path
