"""Probe: is the autoencoder's ceiling a matter of capacity or of training length?

    python bench/autoencoder_capacity.py [--steps 4000] [--variants base latent8 wide]
        [--out runs/bench_ae_capacity] [--results bench/results/autoencoder_capacity_<date>.json]

Fresh autoencoders are trained centrally with the product's own step
(``synthct.training.autoencoder_step``: L1 + edge + lung-window detail + KL) on the demo
phantoms' pooled ``train`` split, one per variant (``base``: the demo config; ``latent8``: 8
latent channels; ``wide``: channels 32/64; ``edge2``: the gradient-difference loss 4x heavier;
``base`` is also scored at every ``--every`` steps to see whether length alone moves the
ceiling). A fresh real cohort (seed 4242, 70 cases, each
for its own site) is reconstructed by each and gated against the demo's ``holdout``, as
bench/autoencoder_ceiling.py does for the shipped generator; the per-feature gaps of the
radiomics (mean of reconstructions minus mean of the real cases, in the real cases' SDs) say
what the autoencoder loses. ``holdout`` and a fresh cohort only: the ``test`` split is not read.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from phantom_world import phantom_manifest

from synthct.artifacts import library_versions, write_json
from synthct.checkpoint import build_generator
from synthct.config import load_config, packaged_config_path
from synthct.data.dataset import load_cases
from synthct.data.manifest import read_manifest, write_manifest
from synthct.data.preprocess import model_to_hu
from synthct.data.volume_io import write_nifti
from synthct.eval import negatives
from synthct.eval.features import RADIOMICS_NAMES, radiomics_features
from synthct.eval.gate import load_real, run_gate
from synthct.pretrained import load_phantom_reference
from synthct.sampling import reconstruct
from synthct.training import BalancedSampler, autoencoder_step, detail_range

VARIANTS = {
    "base": {},
    "latent8": {"latent_channels": 8},
    "wide": {"channels": [32, 64]},
    "edge2": {"edge_weight": 2.0},  # sharper edges for the same capacity: is it the loss?
}


def feature_gaps(real: np.ndarray, recon: np.ndarray) -> dict[str, float]:
    """Per radiomics feature, (mean reconstruction - mean real) / SD of the real cases."""
    sd = real.std(0) + 1e-9
    gaps = (recon.mean(0) - real.mean(0)) / sd
    return {n: round(float(g), 3) for n, g in zip(RADIOMICS_NAMES, gaps, strict=True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--every", type=int, default=0, help="also score base at every N steps")
    p.add_argument(
        "--variants", nargs="+", default=["base", "latent8", "wide"], choices=list(VARIANTS)
    )
    p.add_argument("--out", default="runs/bench_ae_capacity")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_config = load_config(packaged_config_path("demo"))
    manifest = phantom_manifest(base_config, out)
    train = load_cases(manifest, base_config, splits=("train",))
    reference = load_phantom_reference(base_config.labels.vocabulary_hash)
    real = load_real(manifest, manifest, config=base_config, reference=reference)
    counts = {"nodule": 20, "ground_glass": 20, "consolidation": 30}
    fresh = negatives.fresh_real_cohort(base_config, counts, out / "fresh", seed=4242)
    rows = read_manifest(fresh)
    fresh_cases = load_cases(fresh, base_config, splits=("train",))
    window = base_config.data.hu_window
    real_radiomics = radiomics_features(model_to_hu(fresh_cases.images, window))
    results = {
        "kind": "bench-autoencoder-capacity",
        "date": time.strftime("%Y-%m-%d"),
        "versions": library_versions(),
        "command": (
            f"python bench/autoencoder_capacity.py --steps {args.steps} --every {args.every} "
            f"--variants {' '.join(args.variants)} --out {args.out} --results {args.results}"
        ),
        "steps": args.steps,
        "fresh_cohort": {"seed": 4242, "cases": len(rows)},
        "runs": [],
    }

    def score(name: str, gen, steps_done: int, wall: float, losses: dict) -> None:
        with torch.no_grad():
            recon = model_to_hu(reconstruct(gen, fresh_cases.images), window)
        d = out / f"{name}_{steps_done}"
        for row, v in zip(rows, recon, strict=True):
            write_nifti(d / row.path, v[0].numpy(), base_config.data.spacing_mm)
        write_manifest(d / "manifest.csv", rows)
        rep = run_gate(d / "manifest.csv", real, config=base_config, reference=reference)
        values = {r["rule"]: r["value"] for r in rep["rules"]}
        run = {
            "variant": name,
            "steps": steps_done,
            "parameters": sum(p.numel() for p in gen.autoencoder.parameters()),
            "wall_s": round(wall, 1),
            "last_losses": {k: round(v, 4) for k, v in losses.items()},
            "failed_rules": rep["failed_rules"],
            "rules": values,
            "radiomics_gaps_sd": feature_gaps(real_radiomics, radiomics_features(recon)),
        }
        print(json.dumps(run), flush=True)
        results["runs"].append(run)
        if args.results:
            write_json(args.results, results, kind="bench-autoencoder-capacity")

    for name in args.variants:
        ae_cfg = base_config.autoencoder.model_copy(update=VARIANTS[name])
        config = base_config.model_copy(update={"autoencoder": ae_cfg})
        gen = build_generator(config, seed=0)
        opt = torch.optim.AdamW(gen.autoencoder.parameters(), lr=config.train.ae_lr)
        g = torch.Generator().manual_seed(0)
        sampler = BalancedSampler(train.labels, balanced=False, generator=g)
        detail = detail_range(config.autoencoder, window)
        start, parts = time.perf_counter(), {}
        for step in range(1, args.steps + 1):
            idx = sampler(config.train.batch_size)
            parts = autoencoder_step(
                gen.autoencoder, opt, train.images[idx], config.autoencoder, detail=detail
            )
            last = step == args.steps
            if last or (name == "base" and args.every and step % args.every == 0):
                score(name, gen, step, time.perf_counter() - start, parts)


if __name__ == "__main__":
    main()
