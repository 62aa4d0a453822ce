"""Do the generator's own cohorts pass the gate? The demo's cohort over several sampling seeds.

    python bench/cohort_gate.py [--generator DIR] [--seeds 0 1 2] [--out runs/bench_cohort_gate]
        [--results bench/results/cohort_gate_<date>.json]

For each seed, the demo's per-site cohort (every site's deficit against a balanced case mix,
each case sampled for the site it is made for) is generated from the generator (the shipped
phantom generator by default, with its own inference settings) and gated with the default
rules against the demo phantoms' ``train``/``holdout`` and the shipped reference models, as
``synthct demo`` does. Records every rule's value, limit and verdict per seed, per target site
the style distance (class-adjusted HU/texture features, the ``site_style`` rule's) of the cases
made for it to its own scans and to the nearest other site's, and the wall time of sampling and
gating. Nothing is loosened: the rules are ``DEFAULT_RULES``.

With ``--insert-noise soft_tissue`` (or ``whole``) each cohort is also gated with scanner noise
added to every volume, drawn from its target site's noise power spectrum: the periodogram of
that site's ``train`` scans minus their reconstructions by this generator's autoencoder (over
uniform soft tissue, or the whole volume), as ``bench/autoencoder_ceiling.py`` measures it and
the field's CT noise-insertion tools do. A probe of the remedy, which is now a product stage
(``synthct.models.scanner_noise``): with ``--compare-scanner-noise`` each seed's cohort is
generated and gated twice, with the generator's own measured scanner noise off and on (the same
latents: the noise is drawn after them).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from autoencoder_ceiling import insert_noise, reconstruct_hu, residual_spectrum
from phantom_world import phantom_manifest

from synthct.artifacts import read_json, write_json
from synthct.checkpoint import generator_sha256, load_generator
from synthct.cohort import generate_cohort, plan_cohort, reference_counts
from synthct.config import load_config, packaged_config_path
from synthct.data.dataset import load_cases
from synthct.data.manifest import read_manifest, write_manifest
from synthct.data.preprocess import model_to_hu
from synthct.data.volume_io import write_nifti
from synthct.eval.gate import load_real, run_gate, write_gate
from synthct.pretrained import load_phantom_reference, phantom_dir


def site_spectra(gen, manifest: Path, config, kind: str) -> dict[str, torch.Tensor]:
    """Per site, the mean periodogram of its ``train`` scans minus their reconstructions."""
    window, out = config.data.hu_window, {}
    for site in config.site_names:
        train = load_cases(manifest, config, splits=("train",), sites=(site,))
        x = model_to_hu(train.images, window)
        out[site] = residual_spectrum(
            x, reconstruct_hu(gen, train.images, train.sites, window), kind
        )
    return out


def with_noise(cohort: Path, out: Path, spectra, config, seed: int) -> Path:
    """The cohort with each volume's target-site noise added (HU, clamped to the window)."""
    rows = read_manifest(cohort)
    cases = load_cases(cohort, config, splits=("train",))
    if [r.site for r in rows] != list(cases.sites):
        raise ValueError(f"{cohort}: manifest rows and loaded cases differ in order")
    hu = model_to_hu(cases.images, config.data.hu_window)
    g = torch.Generator().manual_seed(seed)
    for row, vol in zip(rows, hu, strict=True):
        noisy = (vol[0] + insert_noise(spectra[row.site], vol.shape[1:], g)).clamp(
            *config.data.hu_window
        )
        write_nifti(out / row.path, noisy.numpy(), config.data.spacing_mm)
    write_manifest(out / "manifest.csv", rows)
    return out / "manifest.csv"


def gate_summary(report: dict) -> dict:
    """A gate report's verdict, every rule's value / limit / verdict, and per target site the
    style distance of the cases made for it to its own scans and to the nearest other site's."""
    rules = {
        r["rule"]: {"value": r["value"], "limit": r["threshold"], "passed": r["passed"]}
        for r in report["rules"]
    }
    per_site = report["metrics"]["site_style_match"].get("detail", {}).get("per_site", {})
    style = {
        site: {
            "own": d["distance"][site],
            "nearest_other": min(v for s, v in d["distance"].items() if s != site),
            "nearest": d["nearest"],
        }
        for site, d in per_site.items()
    }
    return {
        "site_style_distance": style,
        "verdict": report["verdict"],
        "failed_rules": report["failed_rules"],
        "rules": rules,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--generator", type=Path, default=phantom_dir() / "generator")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_cohort_gate"))
    parser.add_argument(
        "--results",
        type=Path,
        default=Path(f"bench/results/cohort_gate_{time.strftime('%Y-%m-%d')}.json"),
    )
    parser.add_argument("--insert-noise", choices=["soft_tissue", "whole"], default=None)
    parser.add_argument(
        "--compare-scanner-noise",
        action="store_true",
        help="gate every seed's cohort without and with the generator's own scanner noise",
    )
    args = parser.parse_args()
    config = load_config(packaged_config_path("demo"))
    manifest = phantom_manifest(config, args.out)
    gen = load_generator(args.generator)
    reference = load_phantom_reference(config.labels.vocabulary_hash)
    real = load_real(manifest, manifest, config=config, reference=reference)
    plan = plan_cohort(
        reference_counts(manifest, config), list(config.labels.classes), per_site=True
    )
    runs = []
    sha = generator_sha256(args.generator)
    spectra = None
    if args.insert_noise:
        with torch.no_grad():
            spectra = site_spectra(gen, manifest, config, args.insert_noise)
    # each seed's cohort with the generator's scanner noise off, then on: the same latents
    variants: list[bool | None] = [False, True] if args.compare_scanner_noise else [None]
    for seed, noise in [(s, v) for s in args.seeds for v in variants]:
        start = time.perf_counter()
        folder = args.out / f"cohort_{sha[:8]}_{seed}"  # one per generator: reruns resume
        if noise is not None:
            folder = Path(f"{folder}_scanner_noise_{'on' if noise else 'off'}")
        cohort = generate_cohort(gen, args.generator, plan, folder, seed=seed, scanner_noise=noise)
        if spectra is not None:
            folder = Path(f"{folder}_noise_{args.insert_noise}")
            cohort = with_noise(cohort, folder, spectra, config, seed)
        sampled = time.perf_counter()
        report = run_gate(cohort, real, config=config, reference=reference, seed=seed)
        write_gate(report, folder / "gate.json")
        summary = gate_summary(report)
        runs.append(
            {
                "seed": seed,
                "scanner_noise": read_json(folder / "cohort.json")["scanner_noise"],
                **summary,
                "sample_s": round(sampled - start, 1),
                "gate_s": round(time.perf_counter() - sampled, 1),
            }
        )
        print(
            f"seed {seed} noise {noise}: {report['verdict']} {report['failed_rules']}", flush=True
        )
        for name, r in summary["rules"].items():
            print(f"  {name:<22} {r['value']!s:>10} limit {r['limit']!s:>8}  {r['passed']}")
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu ({os.cpu_count()} cores)",
        "generator": str(args.generator),
        "generator_sha256": sha,
        "sampling": gen.config.sampling.model_dump(),
        "inserted_noise": args.insert_noise,
        "cases": len(plan),
        "passed": sum(r["verdict"] == "pass" for r in runs),
        "seeds": runs,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.results, summary, kind="bench-cohort-gate")
    print(f"{summary['passed']}/{len(runs)} seeds pass; written {args.results}")


if __name__ == "__main__":
    main()
