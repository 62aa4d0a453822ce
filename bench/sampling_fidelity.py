"""How close do a generator's samples come to real cases in the gate's own fidelity spaces, per
sampling setting? (why a cohort fails ``fidelity_encoder`` / ``fidelity_radiomics``)

    python bench/sampling_fidelity.py [--generator DIR] [--per-class 16] [--seed 0]
        [--results bench/results/sampling_fidelity_<date>.json]

For each sampling variant (sampler, guidance, guidance interval) ``per-class`` volumes of every
class are sampled (site-agnostic) and scored against the demo phantoms' ``holdout`` cases as the
gate scores a cohort: class-matched KID in the reference encoder's features and on the HU /
texture features, minus what the real ``train`` cases score (the gate's baseline), over all
classes and over the demo cohort's class mix (the lesion classes only: the per-site plan makes
no normal cases); per class, the encoder KID of the samples beside the real baseline's; the
within-class MS-SSIM excess (the ``mode_collapse`` rule) and the reference classifier's recall.
A first row scores the autoencoder's reconstructions of the ``train`` cases the same way (the
ceiling a sampler can reach). Only ``holdout`` is looked at: sampling defaults are chosen here.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from phantom_world import bench_command, phantom_manifest

from synthct.checkpoint import load_generator
from synthct.config import load_config, packaged_config_path
from synthct.data.preprocess import hu_to_model
from synthct.eval import distribution as dist
from synthct.eval.diversity import pairwise_msssim
from synthct.eval.features import FeatureSet, extract_features
from synthct.eval.gate import load_real
from synthct.pretrained import load_phantom_reference, phantom_dir
from synthct.sampling import reconstruct, sample_volumes

VARIANTS = [
    {"sampler": "dpmpp", "guidance": 6.0, "guidance_interval": (0.0, 1.0)},
    {"sampler": "dpmpp", "guidance": 6.0, "guidance_interval": (0.3, 1.0)},
    {"sampler": "dpmpp", "guidance": 6.0, "guidance_interval": (0.5, 1.0)},
    {"sampler": "dpmpp", "guidance": 6.0, "guidance_interval": (0.2, 0.8)},
    {"sampler": "dpmpp", "guidance": 6.0, "guidance_interval": (0.0, 0.5)},
    {"sampler": "dpmpp", "guidance": 3.0, "guidance_interval": (0.3, 1.0)},
    {"sampler": "dpmpp", "guidance": 9.0, "guidance_interval": (0.3, 1.0)},
    {"sampler": "dpmpp_sde", "guidance": 6.0, "guidance_interval": (0.3, 1.0)},
]


def kid_excess(fs: FeatureSet, real, space: str) -> float:
    """The gate's class-matched KID of ``fs`` against holdout minus train's (its baseline)."""
    h, t = real.holdout_features, real.train_features
    ref, syn, base = dist.standardise(h.space(space), fs.space(space), t.space(space))
    ws, wh = dist.class_matched_weights(fs.labels, h.labels)
    wb, wh2 = dist.class_matched_weights(t.labels, h.labels)
    return dist.weighted_kid(syn, ws, ref, wh) - dist.weighted_kid(base, wb, ref, wh2)


def score(fs: FeatureSet, real, classes: list[str]) -> dict:
    h, t = real.holdout_features, real.train_features
    ref, syn, base = dist.standardise(h.encoder, fs.encoder, t.encoder)
    lesions = fs.subset(np.where(fs.labels > 0)[0])
    per_class, msssim = {}, {}
    for c, name in enumerate(classes):
        mine, theirs = fs.labels == c, h.labels == c
        per_class[name] = {
            "samples": round(dist.kid(syn[mine], ref[theirs]), 3),
            "real_train": round(dist.kid(base[t.labels == c], ref[theirs]), 3),
        }
        msssim[name] = round(
            pairwise_msssim(fs.images[torch.as_tensor(mine)])
            - pairwise_msssim(h.images[torch.as_tensor(theirs)]),
            4,
        )
    return {
        "encoder_kid_excess": round(kid_excess(fs, real, "encoder"), 3),
        "encoder_kid_excess_lesion_mix": round(kid_excess(lesions, real, "encoder"), 3),
        "radiomics_kid_excess": round(kid_excess(fs, real, "radiomics"), 3),
        "radiomics_kid_excess_lesion_mix": round(kid_excess(lesions, real, "radiomics"), 3),
        "encoder_kid_per_class": per_class,
        "msssim_excess_per_class": msssim,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generator", default=None, help="generator folder (default: shipped)")
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench_sampling_fidelity")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    config = load_config(packaged_config_path("demo"))
    classes = list(config.labels.classes)
    window = config.data.hu_window
    manifest = phantom_manifest(config, Path(args.out))
    gen = load_generator(args.generator or phantom_dir() / "generator")
    reference = load_phantom_reference(config.labels.vocabulary_hash)
    real = load_real(manifest, manifest, config=config, reference=reference)
    train = real.train
    with torch.no_grad():
        recon = reconstruct(gen, train.images, sites=train.sites)
    ceiling = score(
        extract_features(recon, train.labels, train.sites, reference, window), real, classes
    )
    print(f"reconstructions of train: {json.dumps(ceiling)}", flush=True)
    labels = torch.arange(len(classes)).repeat_interleave(args.per_class)
    rows = []
    for variant in VARIANTS:
        sampling = gen.config.sampling.model_copy(update=variant)
        gen.config = gen.config.model_copy(update={"sampling": sampling})
        start = time.perf_counter()
        hu = sample_volumes(gen, labels, generator=torch.Generator().manual_seed(args.seed))
        wall = time.perf_counter() - start
        images = hu_to_model(hu, window)
        fs = extract_features(images, labels, ["pooled"] * len(labels), reference, window)
        predicted = reference.predict(images).argmax(1)
        recall = {
            name: round(float((predicted[labels == c] == c).float().mean()), 3)
            for c, name in enumerate(classes)
        }
        row = {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in variant.items()},
            "steps": sampling.steps,
            **score(fs, real, classes),
            "conditional_recall": recall,
            "sampling_wall_s": round(wall, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu ({os.cpu_count()} cores)",
        "generator": args.generator or "shipped (synthct/pretrained/phantom/generator)",
        "split": "holdout (baseline: train vs holdout)",
        "per_class": args.per_class,
        "seed": args.seed,
        "reconstructions_of_train": ceiling,
        "variants": rows,
        "command": bench_command("sampling_fidelity.py", args),
    }
    if args.results:
        Path(args.results).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
