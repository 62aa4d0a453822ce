"""Bench: generator quality after centralised training within a time budget.

    python bench/generator_quality.py --budget-min 60 [--config C] [--run DIR] [--resume]
        [--guidance G [G ...]]

(a) autoencoder ceiling: reference-classifier accuracy on reconstructions of ``holdout``
    phantoms, per class (target >= 0.9 each);
(b) conditional accuracy of class-conditional samples, per class (target >= 0.8 mean, >= 0.6
    each; chance 0.25), with a per-class HU-histogram distance (L1 between normalised
    histograms of synthetic and real holdout volumes) and within-class pairwise MS-SSIM
    (diversity; synthetic next to real).
``--guidance`` samples the same trained generator at each scale (default: the config's); the
headline numbers are the first scale's, ``guidance_sweep`` has all of them.
Prints JSON and writes it to RUN/bench_generator_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from phantom_world import phantom_manifest

from synthct.artifacts import write_json
from synthct.config import load_config, packaged_config_path
from synthct.data.dataset import load_cases
from synthct.eval.generator_quality import conditional_report, generator_report
from synthct.reference import load_reference
from synthct.trainer import train_central
from synthct.training import resolve_device


def log_progress(phase: str, step: int, total: int, **metrics: float) -> None:
    """One line every 100 steps so a long bench shows where it is."""
    if step % 100 == 0 or step == total:
        loss = metrics.get("loss")
        loss_text = f" loss={loss:.4f}" if loss is not None else ""
        print(f"{time.strftime('%H:%M:%S')} {phase} {step}/{total}{loss_text}", flush=True)


SWEEP_KEYS = (
    "conditional_accuracy_mean",
    "conditional_accuracy_per_class",
    "hu_histogram_l1_per_class",
    "pairwise_msssim_per_class",
)


def _sweep_row(report: dict) -> dict:
    """One guidance scale's numbers from a (generator or conditional) report."""
    return {"guidance": report["sampling"]["guidance"], **{k: report[k] for k in SWEEP_KEYS}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(packaged_config_path("demo")))
    parser.add_argument("--run", default="runs/bench_generator")
    parser.add_argument("--budget-min", type=float, default=60.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--samples-per-class", type=int, default=16)
    parser.add_argument("--guidance", type=float, nargs="+", help="default: the config's")
    args = parser.parse_args()
    config = load_config(args.config)
    run = Path(args.run)
    manifest = phantom_manifest(config, run)
    device = resolve_device(config.train.device)
    start = time.perf_counter()
    gen = train_central(
        config, manifest, run, resume=args.resume, budget_min=args.budget_min, progress=log_progress
    )
    train_s = time.perf_counter() - start
    reference = load_reference(run / "reference", vocabulary_hash=config.labels.vocabulary_hash)
    holdout = load_cases(manifest, config, splits=("holdout",))
    scales = args.guidance or [config.sampling.guidance]
    report = generator_report(
        gen, reference, holdout, per_class=args.samples_per_class, guidance=scales[0], device=device
    )
    sweep = [_sweep_row(report)]
    for scale in scales[1:]:
        cond = conditional_report(
            gen, reference, holdout, per_class=args.samples_per_class, guidance=scale, device=device
        )
        sweep.append(_sweep_row(cond))
    state = json.loads((run / "train_state" / "state.json").read_text())
    steps = {"autoencoder": 0, "diffusion": 0}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        steps[row["phase"]] = max(steps[row["phase"]], row["step"])
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": str(device),
        "cores": os.cpu_count(),
        "budget_min": args.budget_min,
        "train_wall_s": round(train_s, 1),  # this process, reference models included
        "generator_train_min": round(state["wall_s"] / 60, 1),  # all sessions, generator only
        "steps_done": steps,
        **report,
        "guidance_sweep": sweep,
    }
    write_json(run / "bench_generator_quality.json", result, kind="bench-generator-quality")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
