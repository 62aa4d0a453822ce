"""Does the autoencoder keep lesions? Ceiling over training time for a given compression.

    python bench/ae_compression_probe.py --channels 16,32 --minutes 30 [--out runs/ae_probe]

``--channels 16,32`` is a 2x autoencoder (4x16^3 latents), ``16,32,32`` the demo's 4x one
(4x8^3). Central training on the demo phantoms' pooled train split; every 500 steps the
autoencoder ceiling (reference-classifier recall per class on reconstructions of holdout,
decoded from posterior means; shipped reference models) is printed as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from synthct.config import load_config, packaged_config_path
from synthct.data.dataset import load_cases
from synthct.data.phantoms import write_phantom_sites
from synthct.models.autoencoder import build_autoencoder
from synthct.pretrained import load_phantom_reference
from synthct.reference import evaluate_classifier
from synthct.training import BalancedSampler, autoencoder_step, detail_range, encode_latents


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--channels", default="16,32")
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--out", default="runs/ae_probe")
    args = parser.parse_args()
    channels = tuple(int(c) for c in args.channels.split(","))
    config = load_config(packaged_config_path("demo"))
    ae_cfg = config.autoencoder.model_copy(update={"channels": channels})
    manifest = Path(args.out) / "data" / "manifest.csv"
    if not manifest.is_file():
        write_phantom_sites(config, manifest.parent)
    train = load_cases(manifest, config, splits=("train",))
    holdout = load_cases(manifest, config, splits=("holdout",))
    reference = load_phantom_reference(config.labels.vocabulary_hash)
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    ae = build_autoencoder(ae_cfg)
    optimizer = torch.optim.AdamW(ae.parameters(), lr=config.train.ae_lr)
    sampler = BalancedSampler(train.labels, balanced=True, generator=generator)
    detail = detail_range(ae_cfg, config.data.hu_window)
    start, step = time.time(), 0
    while time.time() - start < args.minutes * 60:
        autoencoder_step(ae, optimizer, train.images[sampler(4)], ae_cfg, detail=detail)
        step += 1
        if step % 500:
            continue
        with torch.no_grad():
            z = encode_latents(ae, holdout.images)
            recon = torch.cat([ae.decode(z[i : i + 8]) for i in range(0, len(z), 8)])
        recall = evaluate_classifier(reference.predict(recon.clamp(-1, 1)), holdout.labels, 4)
        line = {
            "date": time.strftime("%Y-%m-%d"),
            "device": f"cpu ({os.cpu_count()} cores)",
            "channels": list(channels),
            "latent": list(z.shape[1:]),
            "step": step,
            "minutes": round((time.time() - start) / 60, 1),
            "ceiling": {
                config.labels.classes[c]: round(v, 3) for c, v in recall["per_class_recall"].items()
            },
        }
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
