"""Configuration of the networks and how they sample: autoencoder, diffusion UNet, noise
schedule and the inference settings."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, model_validator

from synthct.config.base import _Strict

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
    site_norms: bool = Field(
        default=False,
        description="with site_conditioning: every GroupNorm's scale and shift per site "
        "(FedBN's local normalisation for a scanner's feature shift; federated rounds let only "
        "a site move its own rows)",
    )

    @model_validator(mode="after")
    def _levels_match(self) -> UNetConfig:
        if len(self.attention_levels) != len(self.channels):
            raise ValueError("attention_levels must have one entry per channels level")
        if self.site_norms and not self.site_conditioning:
            raise ValueError("site_norms needs site_conditioning (the site comes with the class)")
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
    scanner_noise: bool = Field(
        default=True,
        description="add each case's scanner noise, drawn from its target site's noise power "
        "spectrum measured at training (synthct.models.scanner_noise), to what the decoder "
        "renders; a generator without measured spectra samples without",
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
