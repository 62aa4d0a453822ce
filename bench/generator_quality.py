"""Bench: generator quality after centralised training within a time budget.

    python bench/generator_quality.py --budget-min 60 [--config C] [--run DIR] [--resume]

(a) autoencoder ceiling: reference-classifier accuracy on reconstructions of ``holdout``
    phantoms, per class (target >= 0.9 each);
(b) conditional accuracy of class-conditional samples, per class (target >= 0.8 mean, >= 0.6
    each; chance 0.25), with a per-class HU-histogram distance (L1 between normalised
    histograms of synthetic and real holdout volumes).
Prints JSON and writes it to RUN/bench_generator_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from synthct.artifacts import write_json
from synthct.config import load_config, packaged_config_path
from synthct.data.dataset import load_cases
from synthct.data.phantoms import write_phantom_sites
from synthct.data.preprocess import hu_to_model, model_to_hu
from synthct.eval.reference import evaluate_classifier, load_reference
from synthct.sampling import sample_volumes
from synthct.trainer import train_central
from synthct.training import resolve_device


def hu_histogram(hu: torch.Tensor) -> torch.Tensor:
    h = torch.histc(hu.float().clamp(-1024, 1024), bins=64, min=-1024, max=1024)
    return h / h.sum()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(packaged_config_path("demo")))
    parser.add_argument("--run", default="runs/bench_generator")
    parser.add_argument("--budget-min", type=float, default=60.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--samples-per-class", type=int, default=16)
    args = parser.parse_args()
    config = load_config(args.config)
    run = Path(args.run)
    manifest = run / "data" / "manifest.csv"
    if not manifest.is_file():
        write_phantom_sites(config, run / "data")
    device = resolve_device(config.train.device)
    start = time.perf_counter()
    gen = train_central(config, manifest, run, resume=args.resume, budget_min=args.budget_min)
    train_s = time.perf_counter() - start
    reference = load_reference(run / "reference", vocabulary_hash=config.labels.vocabulary_hash)
    holdout = load_cases(manifest, config, splits=("holdout",))
    classes = config.labels.classes
    with torch.no_grad():
        recon = torch.cat(
            [
                gen.autoencoder.eval()(holdout.images[i : i + 8].to(device))[0].cpu()
                for i in range(0, len(holdout), 8)
            ]
        )
    ceiling = evaluate_classifier(
        reference.predict(recon.clamp(-1, 1)), holdout.labels, len(classes)
    )
    real_acc = evaluate_classifier(reference.predict(holdout.images), holdout.labels, len(classes))
    labels = torch.arange(len(classes)).repeat_interleave(args.samples_per_class)
    t0 = time.perf_counter()
    hu = sample_volumes(gen, labels, generator=torch.Generator().manual_seed(0), device=device)
    sample_s = time.perf_counter() - t0
    cond = evaluate_classifier(
        reference.predict(hu_to_model(hu, config.data.hu_window)), labels, len(classes)
    )
    real_hu = model_to_hu(holdout.images, config.data.hu_window)
    hist_dist = {}
    for c, name in enumerate(classes):
        real_c = real_hu[holdout.labels == c]
        if len(real_c):
            hist_dist[name] = float(
                (hu_histogram(hu[labels == c]) - hu_histogram(real_c)).abs().sum()
            )
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": str(device),
        "cores": os.cpu_count(),
        "budget_min": args.budget_min,
        "train_wall_s": round(train_s, 1),
        "reference_holdout_accuracy": real_acc["accuracy"],
        "ae_ceiling_per_class": {classes[c]: v for c, v in ceiling["per_class_recall"].items()},
        "conditional_accuracy_per_class": {
            classes[c]: v for c, v in cond["per_class_recall"].items()
        },
        "conditional_accuracy_mean": cond["balanced_accuracy"],
        "hu_histogram_l1_per_class": hist_dist,
        "sampling": {
            "sampler": config.sampling.sampler,
            "steps": config.sampling.steps,
            "guidance": config.sampling.guidance,
            "volumes": len(labels),
            "wall_s": round(sample_s, 2),
        },
    }
    write_json(run / "bench_generator_quality.json", result, kind="bench-generator-quality")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
