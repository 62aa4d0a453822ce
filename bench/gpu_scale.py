"""Clinical configs on a GPU: wall time, peak memory and throughput of each phase, beside the
meta-device memory estimate (``synthct config memory``).

    bash bench/gpu.sh            # or: python bench/gpu_scale.py [--configs chest64 chest128]
        [--steps 20] [--results bench/results/gpu_scale_<date>.json]

Per config: a few phantom cases per site and class are rendered at the config's grid; the
full-width generator then runs ``--steps`` autoencoder steps (on the config's patches,
gradient checkpointing as configured), decoder-phase steps, diffusion steps, and samples one
batch with the config's sampler, steps and guidance (decoded whole or by sliding window as
configured), all under bf16 autocast on CUDA. Wall time per step (after one warm-up step),
``torch.cuda.max_memory_allocated`` per phase and the estimate are written. Without a CUDA
GPU it says so and exits with status 2 (``--device cpu`` runs the same code at reduced width,
to check the script, not to measure).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from phantom_world import bench_command

from synthct.artifacts import library_versions
from synthct.checkpoint import build_generator
from synthct.config import SynthctConfig, load_config
from synthct.data.dataset import load_cases
from synthct.data.phantoms import write_phantom_sites
from synthct.models.memory import MIB, estimate_memory
from synthct.models.schedulers import training_scheduler
from synthct.sampling import labels_to_indices, sample_volumes
from synthct.training import (
    LatentDecoder,
    autoencoder_step,
    decoder_step,
    detail_range,
    diffusion_step,
    encode_latents,
)

REDUCED = [  # --device cpu: a width a CPU runs, to check the script end to end
    "autoencoder.channels=[8, 8, 8]",
    "autoencoder.norm_num_groups=4",
    "unet.num_head_channels=8",
    "unet.norm_num_groups=4",
]


def small_world(config: SynthctConfig) -> SynthctConfig:
    """The config's sites with 2 cases per class (a bench of speed, not of quality)."""
    sites = [
        site.model_copy(update={"counts": {c: 2 for c in site.counts}})
        for site in config.data.sites
    ]
    data = config.data.model_copy(update={"sites": sites, "test_per_class": 1})
    return config.model_copy(update={"data": data})


class Phase:
    """Times ``steps`` calls of a step (one warm-up first) and its peak memory on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def run(self, step, steps: int) -> dict[str, float]:
        cuda = self.device.type == "cuda"
        step()  # warm-up: cuDNN autotuning, allocator growth
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        return {
            "s_per_step": round(wall / steps, 4),
            "peak_mib": round(torch.cuda.max_memory_allocated() / MIB, 1) if cuda else None,
        }


def bench_config(name: str, device: torch.device, steps: int, out: Path) -> dict:
    overrides = REDUCED if device.type == "cpu" else []
    config = load_config(name, overrides)
    if device.type == "cpu":
        levels = len(config.unet.channels)
        config = load_config(name, [*overrides, f"unet.channels={[8] * levels}"])
    world = small_world(config)
    started = time.perf_counter()

    def progress(stage: str) -> None:
        print(
            f"{name}: {stage} at {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True
        )

    progress("rendering phantoms")
    manifest = write_phantom_sites(world, out / name)
    progress("building the generator")
    cases = load_cases(manifest, world, splits=("train",))
    gen = build_generator(config, seed=0).to(device)
    bs = config.train.batch_size
    x = cases.images[:bs].to(device)
    labels = cases.labels[:bs].to(device)
    detail = detail_range(config.autoencoder, config.data.hu_window)
    g = torch.Generator().manual_seed(0)
    timer = Phase(device)
    rows: dict[str, dict] = {}

    progress("autoencoder steps")
    ae_opt = torch.optim.AdamW(gen.autoencoder.parameters(), lr=config.train.ae_lr)
    rows["autoencoder"] = timer.run(
        lambda: autoencoder_step(
            gen.autoencoder,
            ae_opt,
            x,
            config.autoencoder,
            detail=detail,
            patch=config.train.ae_patch,
            generator=g,
        ),
        steps,
    )
    progress("decoder steps")
    z = encode_latents(gen.autoencoder, x, batch_size=1)
    decoder = LatentDecoder(gen.autoencoder, gen.discriminator)
    dec_opt = torch.optim.AdamW(decoder.parameters(), lr=config.train.decoder_lr)
    rows["decoder"] = timer.run(
        lambda: decoder_step(
            decoder,
            dec_opt,
            z,
            x,
            config.autoencoder,
            detail=detail,
            patch=config.train.ae_patch,
            generator=g,
        ),
        steps,
    )
    progress("diffusion steps")
    unet_opt = torch.optim.AdamW(gen.unet.parameters(), lr=config.train.diffusion_lr)
    scheduler = training_scheduler(config.diffusion)
    rows["diffusion"] = timer.run(
        lambda: diffusion_step(
            gen.unet,
            unet_opt,
            gen.latent_norm.apply(z),
            labels,
            scheduler,
            config.diffusion,
            conditioning=gen.conditioning,
            generator=g,
        ),
        steps,
    )
    progress("sampling")
    wanted = labels_to_indices(gen, [config.labels.classes[-1]] * config.sampling.batch_size)
    sampling = timer.run(
        lambda: sample_volumes(
            gen, wanted, generator=torch.Generator().manual_seed(0), device=device
        ),
        1,
    )
    sampling["volumes_per_s"] = round(config.sampling.batch_size / sampling["s_per_step"], 4)
    rows["sampling (batch, decode included)"] = sampling
    for phase in ("autoencoder", "decoder", "diffusion"):
        rows[phase]["volumes_per_s"] = round(bs / rows[phase]["s_per_step"], 3)
    return {
        "config": name,
        "shape": list(config.data.shape),
        "spacing_mm": list(config.data.spacing_mm),
        "batch_size": bs,
        "ae_patch": list(config.train.ae_patch) if config.train.ae_patch else None,
        "gradient_checkpointing": config.autoencoder.gradient_checkpointing,
        "sampling": config.sampling.model_dump(mode="json"),
        "parameters": {
            "autoencoder": sum(p.numel() for p in gen.autoencoder.parameters()),
            "unet": sum(p.numel() for p in gen.unet.parameters()),
        },
        "phases": rows,
        "estimate_fp32": [r.as_dict() for r in estimate_memory(config)],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["chest64", "chest128"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--results", default=None)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench/gpu_scale.py: no CUDA GPU on this machine; nothing measured "
            "(the clinical configs' memory estimates: synthct config memory --config chest128)",
            file=sys.stderr,
        )
        return 2
    device = torch.device(args.device)
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (reduced width)",
        "versions": library_versions(),
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "configs": [],
        "command": bench_command("gpu_scale.py", args),
    }
    with tempfile.TemporaryDirectory(prefix="synthct-gpu-") as tmp:
        for name in args.configs:
            row = bench_config(name, device, args.steps, Path(tmp))
            print(json.dumps(row), flush=True)
            summary["configs"].append(row)
            if args.results:  # after each config: a run cut short keeps what it measured
                Path(args.results).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
