"""Noise schedules from diffusers: one DDPM schedule for training, fast solvers for sampling.

All schedulers share the training betas, so a model trained once can be sampled with any of
them. ``clip_sample``/``thresholding`` are off: latents are not bounded to [-1, 1].
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from synthct.config import SAMPLERS, DiffusionConfig

if TYPE_CHECKING:  # diffusers is imported where a scheduler is built: importing it costs ~1 s
    # (it pulls in torch._dynamo), which processes that never sample (gate, downstream) skip
    from diffusers import DDPMScheduler
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

__all__ = ["SAMPLERS", "training_scheduler", "sampling_scheduler", "set_timesteps"]


def _common(cfg: DiffusionConfig) -> dict:
    return {
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": cfg.beta_schedule,
        "prediction_type": cfg.prediction_type,
        # zero terminal SNR: t = T is pure noise, and every solver starts from it ("trailing")
        **(
            {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
            if cfg.zero_terminal_snr
            else {}
        ),
    }


def training_scheduler(cfg: DiffusionConfig) -> DDPMScheduler:
    """The forward process q(z_t | z_0) used by the training step (``add_noise``)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**_common(cfg), clip_sample=False)


@contextlib.contextmanager
def _without_numpy2_copy_notice() -> Iterator[None]:
    """diffusers' solvers call ``np.array`` on torch tensors in ``__init__`` and
    ``set_timesteps``; numpy 2 then warns that ``Tensor.__array__`` lacks ``copy=`` (harmless:
    the array is copied anyway). Silence that one notice, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"__array__ implementation doesn't accept a copy keyword"
        )
        yield


def sampling_scheduler(cfg: DiffusionConfig, sampler: str) -> SchedulerMixin:
    """A reverse-process solver: ``dpmpp`` (DPM-Solver++ 2M), ``dpmpp_sde`` (its stochastic
    variant, SDE-DPM-Solver++: fresh noise every step, more diverse samples), ``euler_a``
    (Euler ancestral), ``unipc``, ``ddim`` or ``ddpm``."""
    with _without_numpy2_copy_notice():
        return _sampling_scheduler(cfg, sampler)


def set_timesteps(scheduler: SchedulerMixin, steps: int, device: torch.device | str) -> None:
    """``scheduler.set_timesteps`` without diffusers' numpy-2 notice (once per batch)."""
    with _without_numpy2_copy_notice():
        scheduler.set_timesteps(steps, device=device)


def _sampling_scheduler(cfg: DiffusionConfig, sampler: str) -> SchedulerMixin:
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    common = _common(cfg)
    if sampler in ("dpmpp", "dpmpp_sde"):
        return DPMSolverMultistepScheduler(
            **common,
            algorithm_type="dpmsolver++" if sampler == "dpmpp" else "sde-dpmsolver++",
            solver_order=2,
            thresholding=False,
            lower_order_final=True,
        )
    if sampler == "euler_a":
        return EulerAncestralDiscreteScheduler(**common)
    if sampler == "unipc":
        return UniPCMultistepScheduler(**common, solver_order=2, thresholding=False)
    if sampler == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False)
    if sampler == "ddpm":
        return DDPMScheduler(**common, clip_sample=False)
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
