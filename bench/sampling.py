"""Bench: synthct's fast sampler vs the reference way of sampling a MONAI latent diffusion model.

    python bench/sampling.py --run RUN [--per-class 8] [--guidance G]

RUN holds a trained generator (``RUN/generator``) and reference models (``RUN/reference``), e.g.
from ``bench/generator_quality.py``. Both arms sample the same classes with the **same guidance**:

* reference: MONAI ``LatentDiffusionInferer`` + MONAI ``DDPMScheduler`` (1000 steps,
  ``clip_sample=False``, the training betas and prediction type); MONAI passes the condition as
  ``context`` and the null condition as ``cfg_fill_value``, so the UNet is wrapped to read
  ``context`` as class labels;
* fast: ``synthct.sampling.sample_volumes`` (diffusers DPM-Solver++ by default, config steps).

Each arm runs in its own subprocess so its peak RSS is its own. Reports volumes/s, end-to-end
speed ratio, denoiser-call ratio, decode share, peak memory, and quality per arm (reference
classifier's conditional accuracy, HU-histogram L1 to real holdout). Writes
RUN/bench_sampling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn


class ContextAsClassLabels(nn.Module):
    """MONAI's inferer calls ``unet(x, timesteps=t, context=c)``; our UNet wants class labels."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.calls = 0

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None
    ):
        self.calls += 1
        labels = context.reshape(-1).round().long()
        return self.unet(x, timesteps.expand(x.shape[0]).to(x.device), class_labels=labels)


def _arm(args: argparse.Namespace) -> dict:
    from synthct.checkpoint import load_generator
    from synthct.data.preprocess import model_to_hu
    from synthct.models.schedulers import sampling_scheduler
    from synthct.sampling import decode_latents, sample_latents

    torch.set_num_threads(os.cpu_count() or 1)
    gen = load_generator(Path(args.run) / "generator")
    config = gen.config
    classes = config.labels.classes
    labels = torch.arange(len(classes)).repeat_interleave(args.per_class)
    guidance = args.guidance if args.guidance is not None else config.sampling.guidance
    batch = config.sampling.batch_size
    volumes, unet_calls, decode_s = [], 0, 0.0
    start = time.perf_counter()
    if args.arm == "reference":
        from monai.inferers import LatentDiffusionInferer
        from monai.networks.schedulers import DDPMScheduler

        d = config.diffusion
        scheduler = DDPMScheduler(
            num_train_timesteps=d.num_train_timesteps,
            schedule=f"{d.beta_schedule}_beta"
            if d.beta_schedule != "squaredcos_cap_v2"
            else "cosine",
            beta_start=d.beta_start,
            beta_end=d.beta_end,
            prediction_type=d.prediction_type,
            clip_sample=False,
        )
        scheduler.set_timesteps(d.num_train_timesteps)
        if gen.latent_norm.mode != "global":
            raise SystemExit("the MONAI inferer arm takes one global scale factor only")
        inferer = LatentDiffusionInferer(scheduler, scale_factor=gen.latent_norm.scale[0])
        wrapped = ContextAsClassLabels(gen.ema.eval())
        torch.manual_seed(0)
        for i in range(0, len(labels), batch):
            lab = labels[i : i + batch]
            noise = torch.randn(len(lab), *config.latent_shape)
            with torch.no_grad():
                out = inferer.sample(
                    input_noise=noise,
                    autoencoder_model=gen.autoencoder.eval(),
                    diffusion_model=wrapped,
                    scheduler=scheduler,
                    conditioning=lab.float().view(-1, 1, 1),
                    mode="crossattn",
                    verbose=False,
                    cfg=guidance,
                    cfg_fill_value=float(gen.null_class),
                )
            volumes.append(out)
        total_s = time.perf_counter() - start
        unet_calls = wrapped.calls
        # the inferer decodes inside sample(): estimate its share by timing the same decodes
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(labels), batch):
                decode_latents(gen, torch.randn(len(labels[i : i + batch]), *config.latent_shape))
        decode_s = time.perf_counter() - t0
    else:
        generator = torch.Generator().manual_seed(0)
        sampler = sampling_scheduler(config.diffusion, config.sampling.sampler)
        calls = {"n": 0}

        def denoiser(x, t, c, _requested):
            calls["n"] += 1
            return gen.ema(x, t, class_labels=c)

        for i in range(0, len(labels), batch):
            lab = labels[i : i + batch]
            with torch.no_grad():
                z = sample_latents(
                    denoiser,
                    sampler,
                    lab,
                    latent_shape=config.latent_shape,
                    conditioning=gen.conditioning,
                    guidance=guidance,
                    steps=config.sampling.steps,
                    generator=generator,
                    device=torch.device("cpu"),
                )
                t0 = time.perf_counter()
                volumes.append(decode_latents(gen, z, patch=config.sampling.decode_patch))
                decode_s += time.perf_counter() - t0
        unet_calls = calls["n"]
        total_s = time.perf_counter() - start
    hu = model_to_hu(torch.cat(volumes).clamp(-1, 1), config.data.hu_window)
    from safetensors.torch import save_file

    save_file({"hu": hu.contiguous(), "labels": labels}, args.volumes_out)
    return {
        "arm": args.arm,
        "volumes": len(labels),
        "guidance": guidance,
        "steps": config.diffusion.num_train_timesteps
        if args.arm == "reference"
        else config.sampling.steps,
        "sampler": "monai-ddpm" if args.arm == "reference" else config.sampling.sampler,
        "wall_s": round(total_s, 2),
        "volumes_per_s": round(len(labels) / total_s, 4),
        "unet_calls": unet_calls,
        "decode_share": round(decode_s / total_s, 4),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _quality(run: Path, volumes_file: str) -> dict:
    from safetensors.torch import load_file

    from synthct.checkpoint import generator_config
    from synthct.data.dataset import load_cases
    from synthct.data.preprocess import hu_to_model, model_to_hu
    from synthct.eval.generator_quality import hu_histogram
    from synthct.reference import evaluate_classifier, load_reference

    config = generator_config(run / "generator")
    data = load_file(volumes_file)
    hu, labels = data["hu"], data["labels"]
    reference = load_reference(run / "reference", vocabulary_hash=config.labels.vocabulary_hash)
    acc = evaluate_classifier(
        reference.predict(hu_to_model(hu, config.data.hu_window)), labels, config.labels.num_classes
    )
    holdout = load_cases(run / "data" / "manifest.csv", config, splits=("holdout",))
    real = model_to_hu(holdout.images, config.data.hu_window)

    return {
        "conditional_accuracy_mean": acc["balanced_accuracy"],
        "conditional_accuracy_per_class": {
            config.labels.classes[c]: v for c, v in acc["per_class_recall"].items()
        },
        "hu_histogram_l1": float((hu_histogram(hu) - hu_histogram(real)).abs().sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="runs/bench_generator")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--arm", choices=["reference", "fast"], help=argparse.SUPPRESS)
    parser.add_argument("--volumes-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:  # child process: one arm, JSON on stdout
        print(json.dumps(_arm(args)))
        return
    run = Path(args.run)
    results = {}
    for arm in ("fast", "reference"):
        out = run / f"bench_sampling_{arm}.safetensors"
        cmd = [sys.executable, __file__, "--run", str(run), "--per-class", str(args.per_class)]
        cmd += ["--arm", arm, "--volumes-out", str(out)]
        if args.guidance is not None:
            cmd += ["--guidance", str(args.guidance)]
        print(f"{time.strftime('%H:%M:%S')} sampling arm {arm} ...", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[arm] = json.loads(proc.stdout.strip().splitlines()[-1])
        results[arm]["quality"] = _quality(run, str(out))
    fast, ref = results["fast"], results["reference"]
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": "cpu",
        "cores": os.cpu_count(),
        "speed_ratio": round(ref["wall_s"] / fast["wall_s"], 1),
        "denoiser_call_ratio": round(ref["unet_calls"] / fast["unet_calls"], 1),
        "arms": results,
    }
    from synthct.artifacts import write_json

    write_json(run / "bench_sampling.json", summary, kind="bench-sampling")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
