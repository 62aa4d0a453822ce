"""The autoencoder's ceiling: what the gate says of reconstructions of real scans.

    python bench/autoencoder_ceiling.py [--generator DIR] [--config C] [--out runs/bench_ae_ceiling]
        [--results bench/results/autoencoder_ceiling.json]

A latent-diffusion generator can be no more realistic than its autoencoder's reconstructions.
A fresh real cohort (phantoms of another seed, each case for the site it was rendered at) is
gated as it is (real data: must pass), then as its reconstructions through the generator's
autoencoder (the ceiling), then with scanner noise re-inserted from the sites' noise power
spectra (NPS of scan minus reconstruction: over the whole volume, and over uniform soft
tissue only, as NPS is measured in CT), the field's noise-insertion remedy. Per site it
also records the high-frequency noise (scan minus its 1-voxel Gaussian smoothing, soft
tissue) and its radially averaged NPS, real vs reconstruction vs samples made for the site (in
its train case mix), and draws them (PNG next to the results file).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from phantom_world import bench_command, phantom_world  # noqa: E402
from scipy import ndimage  # noqa: E402

from synthct.checkpoint import load_generator  # noqa: E402
from synthct.config import load_config, packaged_config_path  # noqa: E402
from synthct.data.dataset import load_cases  # noqa: E402
from synthct.data.manifest import read_manifest, write_manifest  # noqa: E402
from synthct.data.preprocess import model_to_hu  # noqa: E402
from synthct.data.volume_io import write_nifti  # noqa: E402
from synthct.eval import negatives  # noqa: E402
from synthct.eval.gate import load_real, run_gate  # noqa: E402
from synthct.models.scanner_noise import ScannerNoise, noise_power, soft_tissue  # noqa: E402
from synthct.pretrained import phantom_dir, shipped_reference_for  # noqa: E402
from synthct.reference import load_reference  # noqa: E402
from synthct.sampling import reconstruct, sample_volumes  # noqa: E402
from synthct.trainer import ensure_reference  # noqa: E402

COUNTS = {"nodule": 20, "ground_glass": 20, "consolidation": 30}


def reconstruct_hu(gen, images: torch.Tensor, sites: list[str], window) -> torch.Tensor:
    """HU reconstructions (posterior means decoded for each case's site), N×1×X×Y×Z."""
    return model_to_hu(reconstruct(gen, images, sites=sites), window)


def residual_spectrum(x: torch.Tensor, r: torch.Tensor, kind: str) -> torch.Tensor:
    """Mean periodogram of scans ``x`` minus their reconstructions ``r`` (HU): over uniform
    soft tissue in both (``soft_tissue``, the product's scanner noise measure) or over the
    whole volume (``whole``: every residual, edges and all)."""
    if kind == "whole":
        d = (x - r).double()
        d = d - d.mean(dim=(2, 3, 4), keepdim=True)
        count = float(np.prod(d.shape[2:]))
        return (torch.fft.rfftn(d, dim=(2, 3, 4)).abs().pow(2) / count).mean(dim=(0, 1)).float()
    power = noise_power(x, r)
    return (power.total / power.cases).float()


def insert_noise(spectrum: torch.Tensor, shape, generator: torch.Generator) -> torch.Tensor:
    """Gaussian noise with the given mean periodogram (one X×Y×Z volume)."""
    return ScannerNoise({"site": spectrum}).draw(["site"], shape, generator)[0, 0]


def radial_nps(x: torch.Tensor) -> np.ndarray:
    """Radially averaged NPS of high-pass noise (x minus its 1-voxel smoothing) in soft tissue."""
    hp = (x - torch.from_numpy(ndimage.gaussian_filter(x.numpy(), (0, 0, 1, 1, 1)))).double()
    m = soft_tissue(x).double()
    count = m.sum(dim=(2, 3, 4), keepdim=True).clamp_min(1.0)
    r = (hp - (hp * m).sum(dim=(2, 3, 4), keepdim=True) / count) * m
    power = (torch.fft.fftn(r, dim=(2, 3, 4)).abs().pow(2) / count).mean(dim=(0, 1)).numpy()
    p = np.fft.fftshift(power)
    grid = np.indices(p.shape) - (np.array(p.shape) // 2)[:, None, None, None]
    radius = np.sqrt((grid**2).sum(0)).round().astype(int)
    return np.bincount(radius.ravel(), p.ravel()) / np.maximum(np.bincount(radius.ravel()), 1)


def hf_std(x: torch.Tensor) -> float:
    hp = x - torch.from_numpy(ndimage.gaussian_filter(x.numpy(), (0, 0, 1, 1, 1)))
    return float(hp[soft_tissue(x)].std())


def gate_values(manifest: Path, real, config, reference) -> dict:
    rep = run_gate(manifest, real, config=config, reference=reference)
    return {
        "verdict": rep["verdict"],
        "failed_rules": rep["failed_rules"],
        "rules": {
            r["rule"]: {"value": r["value"], "threshold": r["threshold"]} for r in rep["rules"]
        },
    }


def write_variant(out: Path, rows, volumes: torch.Tensor, spacing) -> Path:
    for row, vol in zip(rows, volumes, strict=True):
        write_nifti(out / row.path, vol[0].numpy(), spacing)
    write_manifest(out / "manifest.csv", rows)
    return out / "manifest.csv"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--generator", default=str(phantom_dir() / "generator"))
    parser.add_argument("--config", default=str(packaged_config_path("demo")))
    parser.add_argument("--out", default="runs/bench_ae_ceiling")
    parser.add_argument("--results", default=None, help="also write the summary here")
    parser.add_argument("--seed", type=int, default=4242)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    config = load_config(args.config)
    window = config.data.hu_window
    out = Path(args.out)
    manifest, train, holdout = phantom_world(config, out)
    ref_dir = shipped_reference_for(manifest)  # trained on exactly these phantoms, if shipped
    if ref_dir is None:
        ensure_reference(config, train, holdout, out)
        ref_dir = out / "reference"
    reference = load_reference(ref_dir, vocabulary_hash=config.labels.vocabulary_hash)
    gen = load_generator(args.generator)
    real = load_real(manifest, manifest, config=config, reference=reference)

    fresh = negatives.fresh_real_cohort(config, COUNTS, out / "fresh", seed=args.seed)
    rows = read_manifest(fresh)
    cases = load_cases(fresh, config, splits=("train",))
    recon = reconstruct_hu(gen, cases.images, cases.sites, window)

    # the sites' noise spectra, from their train scans and reconstructions
    spectra: dict[str, dict[str, torch.Tensor]] = {"whole": {}, "soft_tissue": {}}
    g_sample = torch.Generator().manual_seed(args.seed)
    per_site: dict[str, dict] = {}
    for site in config.site_names:
        tr = load_cases(manifest, config, splits=("train",), sites=(site,))
        x = model_to_hu(tr.images, window)
        r = reconstruct_hu(gen, tr.images, tr.sites, window)
        for kind in spectra:
            spectra[kind][site] = residual_spectrum(x, r, kind)
        # samples made for the site, in its own train case mix (needs no real scan)
        syn = sample_volumes(gen, tr.labels, sites=[site] * len(tr), generator=g_sample)
        per_site[site] = {
            "hf_noise_std_hu": {
                "real": hf_std(x),
                "reconstruction": hf_std(r),
                "sample": hf_std(syn),
            },
            "inserted_noise_std_hu": {
                kind: float((spectra[kind][site].sum() * 2 / x[0, 0].numel()).sqrt())
                for kind in spectra
            },
            "radial_nps": {
                "real": radial_nps(x).tolist(),
                "reconstruction": radial_nps(r).tolist(),
                "sample": radial_nps(syn).tolist(),
            },
        }

    variants = {
        "real": fresh,
        "reconstruction": write_variant(out / "recon", rows, recon, config.data.spacing_mm),
    }
    g = torch.Generator().manual_seed(0)
    for kind in spectra:
        noisy = torch.stack(
            [
                (recon[i] + insert_noise(spectra[kind][row.site], recon.shape[2:], g)).clamp(
                    *window
                )
                for i, row in enumerate(rows)
            ]
        )
        variants[f"reconstruction+nps_{kind}"] = write_variant(
            out / f"recon_nps_{kind}", rows, noisy, config.data.spacing_mm
        )
    gates = {}
    for name, m in variants.items():
        gates[name] = gate_values(m, real, config, reference)
        print(name, gates[name]["verdict"], gates[name]["failed_rules"], flush=True)

    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu ({os.cpu_count()} cores)",
        "generator": args.generator,
        "config": args.config,
        "cohort": {"counts": COUNTS, "seed": args.seed, "cases": len(rows)},
        "gate": gates,
        "per_site": per_site,
        "wall_s": round(time.perf_counter() - start, 1),
        "command": bench_command("autoencoder_ceiling.py", args),
    }
    out.mkdir(parents=True, exist_ok=True)
    targets = [out / "ceiling.json"] + ([Path(args.results)] if args.results else [])
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1))
    fig, axes = plt.subplots(1, len(per_site), figsize=(4 * len(per_site), 3.2), sharey=True)
    for ax, (site, info) in zip(np.atleast_1d(axes), per_site.items(), strict=True):
        for what, style in (("real", "-"), ("reconstruction", "--"), ("sample", ":")):
            nps = info["radial_nps"][what]
            ax.semilogy(range(1, len(nps)), nps[1:], style, label=what)  # no DC bin: centred
        ax.set_title(site)
        ax.set_xlabel("radial frequency (bins)")
    np.atleast_1d(axes)[0].set_ylabel("NPS of high-pass noise, soft tissue (HU²)")
    np.atleast_1d(axes)[0].legend()
    fig.tight_layout()
    for path in targets:
        fig.savefig(path.with_suffix(".png"), dpi=80)
    print(json.dumps({k: (v["verdict"], v["failed_rules"]) for k, v in gates.items()}, indent=1))


if __name__ == "__main__":
    main()
