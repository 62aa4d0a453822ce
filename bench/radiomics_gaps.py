"""What do reconstructions lose? Per radiomics feature, the gap to the real cases they rebuild.

    python bench/radiomics_gaps.py PROBE_OUT [ARM ...] [--results bench/results/radiomics_gaps_<date>.json]

Reads a bench/site_decoder_probe.py output folder: its fresh real cohort (``fresh/``) and each
named arm's reconstructions of it (``ARM/``), adds the shipped autoencoder's own
reconstructions of the same cases, and reports for every radiomics feature the gate uses
(``synthct.eval.features.RADIOMICS_NAMES``) the mean of the reconstructions minus the mean of
the real cases in units of the real cases' SD, and per site the soft-tissue mean and SD in HU
(the scanner's HU offset and noise). A fresh cohort only: no split of the benchmark is read.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from synthct.artifacts import library_versions, write_json
from synthct.checkpoint import load_generator
from synthct.config import load_config, packaged_config_path
from synthct.data.dataset import load_cases
from synthct.data.preprocess import model_to_hu
from synthct.eval.features import RADIOMICS_NAMES, radiomics_features
from synthct.pretrained import phantom_dir
from synthct.sampling import reconstruct


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("probe_out", type=Path)
    p.add_argument("arms", nargs="*")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    config = load_config(packaged_config_path("demo"))
    window = config.data.hu_window
    fresh = load_cases(args.probe_out / "fresh" / "manifest.csv", config, splits=("train",))
    volumes = {"real": model_to_hu(fresh.images, window)}
    with torch.no_grad():
        shipped = load_generator(phantom_dir() / "generator")
        volumes["shipped"] = model_to_hu(reconstruct(shipped, fresh.images), window)
    for arm in args.arms:
        cases = load_cases(args.probe_out / arm / "manifest.csv", config, splits=("train",))
        volumes[arm] = model_to_hu(cases.images, window)
    feats = {k: radiomics_features(v) for k, v in volumes.items()}
    real = feats["real"]
    sd = real.std(0) + 1e-9
    sites = np.array(fresh.sites)
    soft_mean, soft_std = RADIOMICS_NAMES.index("soft_mean"), RADIOMICS_NAMES.index("soft_std")
    out = {
        "kind": "bench-radiomics-gaps",
        "date": time.strftime("%Y-%m-%d"),
        "versions": library_versions(),
        "command": f"python bench/radiomics_gaps.py {args.probe_out} {' '.join(args.arms)} "
        f"--results {args.results}",
        "cases": len(fresh),
        "gap_in_real_sd": {
            name: {
                n: round(float((f[:, j].mean() - real[:, j].mean()) / sd[j]), 3)
                for j, n in enumerate(RADIOMICS_NAMES)
            }
            for name, f in feats.items()
            if name != "real"
        },
        "per_site_soft_tissue_hu": {
            site: {
                name: {
                    "mean": round(float(f[sites == site, soft_mean].mean()), 1),
                    "sd": round(float(f[sites == site, soft_std].mean()), 1),
                }
                for name, f in feats.items()
            }
            for site in sorted(set(sites))
        },
    }
    print(json.dumps(out, indent=1))
    if args.results:
        write_json(args.results, out, kind="bench-radiomics-gaps")


if __name__ == "__main__":
    main()
