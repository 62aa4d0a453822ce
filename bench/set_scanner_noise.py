"""Give a trained generator its sites' scanner noise, measured federatedly (issue 20: texture).

    python bench/set_scanner_noise.py [--generator synthct/pretrained/phantom/generator]
        [--out runs/set_scanner_noise] [--results bench/results/scanner_noise_<date>.json]
        [--ship]

A Flower simulation on the demo sites continues the generator for zero training rounds: the
only messages are the two site queries every federated run makes once its autoencoder is
final, its latent moments (kept: the autoencoder is unchanged) and each site's scanner noise
spectrum (``synthct.models.scanner_noise``: its ``train`` scans minus their reconstructions by
this autoencoder, over soft tissue). The weights must come out byte-identical, or nothing is
written. Records each site's spectrum as the noise level it implies beside the high-frequency
noise of its own scans. With ``--ship`` the spectra join the shipped generator (its
``noise/`` file and ``config.json``) and ``TRAINING.md`` records the new sha256.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from phantom_world import bench_command, phantom_manifest
from pretrained_phantom import record_new_sha
from scipy import ndimage

from synthct.artifacts import read_json, write_json
from synthct.checkpoint import generator_config, generator_sha256, load_generator, save_generator
from synthct.config import load_config, packaged_config_path
from synthct.data.dataset import load_cases
from synthct.data.preprocess import model_to_hu
from synthct.fed.simulation import train_federated
from synthct.models.scanner_noise import soft_tissue
from synthct.pretrained import phantom_dir


def scan_noise_std(manifest: Path, config, site: str) -> float:
    """High-frequency noise (HU) of a site's ``train`` scans in soft tissue: the volume minus
    its one-voxel Gaussian smoothing (what ``bench/autoencoder_ceiling.py`` reports)."""
    cases = load_cases(manifest, config, splits=("train",), sites=(site,))
    hu = model_to_hu(cases.images, config.data.hu_window)
    smooth = torch.from_numpy(ndimage.gaussian_filter(hu.numpy(), (0, 0, 1, 1, 1)))
    return float((hu - smooth)[soft_tissue(hu)].std())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generator", type=Path, default=phantom_dir() / "generator")
    p.add_argument("--out", type=Path, default=Path("runs/set_scanner_noise"))
    p.add_argument(
        "--results",
        type=Path,
        default=Path(f"bench/results/scanner_noise_{time.strftime('%Y-%m-%d')}.json"),
    )
    p.add_argument("--ship", action="store_true")
    args = p.parse_args()
    command = bench_command("set_scanner_noise.py", args)
    before = generator_sha256(args.generator)
    own = generator_config(args.generator)
    fed = own.federated.model_copy(
        update={
            "ae_rounds": 0,
            "decoder_rounds": 0,
            "diffusion_rounds": 0,
            "site_calibration_rounds": 0,
            "restart_unet": False,
        }
    )
    config = own.model_copy(update={"federated": fed})
    manifest = phantom_manifest(load_config(packaged_config_path("demo")), args.out)
    run = args.out / f"run_{before[:8]}"
    if run.exists():
        shutil.rmtree(run)
    start = time.perf_counter()
    gen = train_federated(config, manifest, run, initial=args.generator)
    wall = time.perf_counter() - start
    if gen.scanner_noise is None:
        print("no site sent a usable scanner noise spectrum; nothing written", file=sys.stderr)
        return 1
    gen.config = own  # its own schedule and inference settings: only the spectra are new
    staged = args.out / "generator"
    trained = read_json(args.generator / "config.json").get("trained")
    save_generator(gen, staged, extra={"trained": trained}, sampling_only=True)
    for weights in args.generator.rglob("*.safetensors"):
        if (staged / weights.relative_to(args.generator)).read_bytes() != weights.read_bytes():
            print(f"{weights}: re-saved weights differ; nothing written", file=sys.stderr)
            return 1
    load_generator(staged)  # every file hash-checked
    rounds = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    queried = [r for r in rounds if r["phase"] == "noise"][-1]  # the committed one
    levels = gen.scanner_noise.noise_std()
    payload = {
        "command": command,
        "generator": str(args.generator),
        "generator_sha256": before,
        "with_noise_sha256": generator_sha256(staged),
        "staged": str(staged),
        "wall_s": round(wall, 1),
        "rounds": rounds,
        "sites": {
            site: {
                "cases": gen.scanner_noise.cases[site],
                "spectrum_noise_std_hu": round(levels[site], 2),
                "scan_high_frequency_std_hu": round(scan_noise_std(manifest, config, site), 2),
            }
            for site in gen.scanner_noise.spectra
        },
        "rejected": queried["rejected"],
    }
    write_json(args.results, payload, kind="bench-scanner-noise")
    print(json.dumps(payload["sites"], indent=1))
    if not args.ship:
        return 0
    shipped = phantom_dir() / "generator"
    if args.generator.resolve() != shipped.resolve():
        print("--ship applies to the shipped generator only", file=sys.stderr)
        return 1
    (shipped / "noise").mkdir(exist_ok=True)
    for name in ("noise/scanner_noise.safetensors", "config.json"):
        shutil.copy2(staged / name, shipped / name)
    record_new_sha(
        before,
        "each site's scanner noise spectrum measured federatedly against its reconstructions "
        f"and added to samples (`{args.results}`), set by `{command}`; weights byte-identical",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
