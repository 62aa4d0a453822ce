"""How good is a generator, by the frozen real-only reference classifier.

Two numbers the generator's targets are stated in: the **autoencoder ceiling** (does the
classifier still recognise each class in reconstructions of real ``holdout`` volumes? a lesion
the autoencoder erases can never be generated) and **conditional accuracy** (is a volume
sampled for class c classified as c?), plus a per-class HU-histogram distance to real holdout
and within-class diversity (pairwise MS-SSIM of the samples next to the real volumes'): the
price stronger guidance pays for accuracy.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from synthct.checkpoint import Generator
from synthct.data.dataset import CaseSet
from synthct.data.preprocess import hu_to_model, model_to_hu
from synthct.eval.diversity import pairwise_msssim
from synthct.reference import ReferenceModel, evaluate_classifier
from synthct.sampling import reconstruct, sample_volumes

__all__ = [
    "hu_histogram",
    "autoencoder_ceiling",
    "conditional_quality",
    "conditional_report",
    "generator_report",
]


def hu_histogram(hu: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """Normalised histogram of HU values in [-1024, 1024]."""
    h = torch.histc(hu.float().clamp(-1024, 1024), bins=bins, min=-1024, max=1024)
    return h / h.sum().clamp_min(1)


@torch.no_grad()
def autoencoder_ceiling(
    gen: Generator, reference: ReferenceModel, cases: CaseSet, batch_size: int = 8
) -> dict[str, Any]:
    """Reference-classifier recall per class on autoencoder reconstructions of ``cases``,
    decoded from the posterior means (what the diffusion model learns from; ``ae(x)`` would
    sample the posterior and make the score vary by a few cases from call to call)."""
    device = next(gen.autoencoder.parameters()).device
    recon = reconstruct(gen, cases.images.to(device), sites=cases.sites, batch_size=batch_size)
    n = gen.config.labels.num_classes
    return evaluate_classifier(reference.predict(recon.clamp(-1, 1)), cases.labels, n)


def conditional_quality(
    gen: Generator,
    reference: ReferenceModel,
    real: CaseSet,
    *,
    per_class: int,
    seed: int = 0,
    guidance: float | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Sample ``per_class`` volumes per class (``guidance`` None: the config's); conditional
    accuracy, HU distance and pairwise MS-SSIM (synthetic, real) per class."""
    config = gen.config
    classes = config.labels.classes
    labels = torch.arange(len(classes)).repeat_interleave(per_class)
    t0 = time.perf_counter()
    hu = sample_volumes(
        gen,
        labels,
        guidance=guidance,
        generator=torch.Generator().manual_seed(seed),
        device=device,
    )
    wall = time.perf_counter() - t0
    synthetic = hu_to_model(hu, config.data.hu_window)
    acc = evaluate_classifier(reference.predict(synthetic), labels, len(classes))
    real_hu = model_to_hu(real.images, config.data.hu_window)
    hist, msssim = {}, {}
    for c, name in enumerate(classes):
        mask = real.labels == c
        if mask.any():
            hist[name] = float(
                (hu_histogram(hu[labels == c]) - hu_histogram(real_hu[mask])).abs().sum()
            )
            msssim[name] = {
                "synthetic": pairwise_msssim(synthetic[labels == c]),
                "real": pairwise_msssim(real.images[mask]),
            }
    return {
        "accuracy": acc,
        "hu_histogram_l1": hist,
        "pairwise_msssim": msssim,
        "guidance": config.sampling.guidance if guidance is None else guidance,
        # the per-class scales the samples used (a given guidance applies to every class)
        "class_guidance": dict(config.sampling.class_guidance) if guidance is None else {},
        "volumes": len(labels),
        "sampling_wall_s": round(wall, 2),
    }


def conditional_report(
    gen: Generator,
    reference: ReferenceModel,
    holdout: CaseSet,
    *,
    per_class: int = 16,
    seed: int = 0,
    guidance: float | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """:func:`conditional_quality` as JSON-able numbers keyed by class name."""
    classes = gen.config.labels.classes
    cond = conditional_quality(
        gen, reference, holdout, per_class=per_class, seed=seed, guidance=guidance, device=device
    )
    return {
        "conditional_accuracy_per_class": {
            classes[c]: v for c, v in cond["accuracy"]["per_class_recall"].items()
        },
        "conditional_accuracy_mean": cond["accuracy"]["balanced_accuracy"],
        "hu_histogram_l1_per_class": cond["hu_histogram_l1"],
        "pairwise_msssim_per_class": cond["pairwise_msssim"],
        "sampling": {
            "sampler": gen.config.sampling.sampler,
            "steps": gen.config.sampling.steps,
            "guidance": cond["guidance"],
            **({"class_guidance": cond["class_guidance"]} if cond["class_guidance"] else {}),
            "volumes": cond["volumes"],
            "wall_s": cond["sampling_wall_s"],
        },
    }


def generator_report(
    gen: Generator,
    reference: ReferenceModel,
    holdout: CaseSet,
    *,
    per_class: int = 16,
    seed: int = 0,
    guidance: float | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """The generator targets' numbers in one JSON-able dict, keyed by class name: reference
    accuracy on real holdout, autoencoder ceiling, then :func:`conditional_report`."""
    classes = gen.config.labels.classes
    ceiling = autoencoder_ceiling(gen, reference, holdout)
    real_acc = evaluate_classifier(reference.predict(holdout.images), holdout.labels, len(classes))
    return {
        "reference_holdout_accuracy": real_acc["accuracy"],
        "ae_ceiling_per_class": {classes[c]: v for c, v in ceiling["per_class_recall"].items()},
        **conditional_report(
            gen,
            reference,
            holdout,
            per_class=per_class,
            seed=seed,
            guidance=guidance,
            device=device,
        ),
    }
