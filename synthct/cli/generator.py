"""``synthct train``, ``sample``, ``generate`` and ``export-bundle``: the generator's life from
training to a cohort (with site plugins applied on the way)."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from synthct.cli.options import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    chosen_device,
    command,
    config_options,
    data_option,
    device_option,
    generator_dir,
    generator_option,
    non_negative_float,
    plugin_options,
    positive_int,
    renamed,
    run_config,
    sampling_options,
    seed_option,
)
from synthct.errors import UsageError


def cmd_train(args: argparse.Namespace) -> int:
    from synthct.pipeline.generator import train_generator
    from synthct.progress import progress_bar

    if args.central and args.max_rounds is not None:
        raise UsageError("--max-rounds is a federated option (rounds); --central trains in steps")
    config = run_config(args.config, args.set)
    if args.device:
        config = config.model_copy(
            update={"train": config.train.model_copy(update={"device": args.device})}
        )
    if args.seed is not None:
        config = config.model_copy(update={"seed": args.seed})
    manifest = Path(args.data) if args.data else None
    run = Path(args.out)
    run.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        from synthct.data.phantoms import write_phantom_sites

        manifest = run / "data" / "manifest.csv"
        if not manifest.is_file():
            write_phantom_sites(config, run / "data")
    with progress_bar("train") as update:

        def report(phase: str, done: int, total: int, **m: float) -> None:
            update(done, total, phase=phase, **m)

        train_generator(
            config,
            manifest,
            run,
            federated=not args.central,
            resume=args.resume,
            budget_min=args.budget_min,
            max_rounds=args.max_rounds,
            progress=report,
        )
    print(f"generator: {run / 'generator'}")
    from synthct.artifacts import read_json

    privacy = read_json(run / "generator" / "config.json").get("privacy")
    if privacy and privacy["epsilon"] is not None:
        print(
            f"privacy: epsilon {privacy['epsilon']:.3g} at delta {privacy['delta']:g} per site, "
            f"{privacy['releases']} noised releases ({', '.join(privacy['phases'])}); "
            f"not covered: {'; '.join(privacy['not_covered'])}"
        )
    return EXIT_OK


def _with_plugins(gen, gen_dir: Path, args: argparse.Namespace):
    """(generator, denoiser or None, provenance note) after applying ``--plugins``."""
    from synthct.pipeline.plugin import apply_plugins

    if args.fit_weights and not args.plugins:
        raise UsageError("--fit-weights needs --plugins")
    return apply_plugins(gen, gen_dir, args.plugins, merge=args.merge, fit_weights=args.fit_weights)


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from synthct.artifacts import write_json
    from synthct.checkpoint import generator_sha256, load_generator
    from synthct.data.volume_io import write_nifti
    from synthct.sampling import (
        inference_settings,
        labels_to_indices,
        sample_volumes,
        sites_to_indices,
    )

    device = chosen_device(args)
    gen_dir = generator_dir(args.generator)
    gen = load_generator(gen_dir, device)
    gen, denoiser, _note = _with_plugins(gen, gen_dir, args)
    if args.site not in (None, "pooled") and not gen.renders_sites:
        raise UsageError(
            f"--site {args.site}: this generator is not site-conditioned (it renders every site "
            "alike); leave --site out"
        )
    try:
        labels = labels_to_indices(gen, [args.label] * args.n)
        sites_to_indices(gen, [args.site])  # an unknown site fails before any work
        sites = [args.site] * args.n
    except (ValueError, KeyError) as exc:
        print(f"synthct: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = Path(args.out)
    stem = f"{args.label}_{args.site or 'pooled'}_seed{args.seed}"
    names = [f"{stem}_{i:04d}.nii.gz" for i in range(args.n)]
    taken = [n for n in [*names, f"{stem}.json"] if (out / n).exists()]
    if taken:  # another run's volumes are never overwritten or mixed with these
        raise UsageError(f"--out {out}: already holds {taken[0]} (use another --out or --seed)")
    settings = inference_settings(gen, args.sampler, args.steps, args.guidance, args.scanner_noise)
    volumes = sample_volumes(
        gen,
        labels,
        **settings,
        generator=torch.Generator().manual_seed(args.seed),
        device=device,
        denoiser=denoiser,
        sites=sites,
    )
    for name, vol in zip(names, volumes, strict=True):
        write_nifti(out / name, vol[0].numpy(), gen.config.data.spacing_mm)
    provenance = {
        "generator_sha256": generator_sha256(gen_dir),
        "plugins": _note,
        "label": args.label,
        "site": args.site,
        "seed": args.seed,
        **settings,
        "files": names,
    }
    write_json(out / f"{stem}.json", provenance, kind="synthct-samples")
    print(f"wrote {len(volumes)} volumes and {stem}.json to {out}")
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from synthct.checkpoint import load_generator
    from synthct.cohort import parse_counts
    from synthct.pipeline.cohort import make_cohort
    from synthct.progress import progress_bar

    device = chosen_device(args)
    gen_dir = generator_dir(args.generator)
    gen = load_generator(gen_dir, device)
    gen, denoiser, note = _with_plugins(gen, gen_dir, args)
    classes = list(gen.config.labels.classes)
    target = parse_counts(args.counts, classes) if args.counts else "balanced"
    with progress_bar("generate") as update:
        cohort = make_cohort(
            gen_dir,
            args.data,
            args.out,
            gen=gen,
            target=target,
            per_site=args.per_site,
            seed=args.seed,
            sampler=args.sampler,
            steps=args.steps,
            guidance=args.guidance,
            batch_size=args.batch_size,
            device=device,
            progress=update,
            denoiser=denoiser,
            plugins=note,
            volume_format=args.format,
            scanner_noise=args.scanner_noise,
        )
    if cohort.manifest is None:
        print("synthct: nothing to generate: the data is already balanced", file=sys.stderr)
        return EXIT_OK
    by_class = Counter(c.label for c in cohort.plan)
    print(f"cohort: {cohort.manifest} ({len(cohort.plan)} cases: {dict(by_class)})")
    return EXIT_OK


def cmd_export_bundle(args: argparse.Namespace) -> int:
    from synthct.bundle import export_bundle

    out = Path(args.out)
    export_bundle(generator_dir(args.generator), out)
    print(
        f"bundle: {out}; sample with python -m monai.bundle run --config_file "
        f"{out}/configs/inference.json --meta_file {out}/configs/metadata.json "
        f"--bundle_root {out} --labels \"['CLASS']\""
    )
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this module's commands to ``synthct``: train, sample, generate, export-bundle."""
    p = command(
        sub,
        "train",
        "train the reference models and the generator (federated by default)",
        "synthct train --data sites/manifest.csv --out runs/gen --resume",
        required=("out",),
    )
    config_options(p)
    data_option(p, "its train split (default: make the config's phantom sites in OUT/data)")
    p.add_argument("--out", help="run folder (checkpoints, logs, generator/)")
    p.add_argument(
        "--central",
        action="store_true",
        help="pool all sites' train split instead of federated training (Flower simulation)",
    )
    p.add_argument(
        "--max-rounds",
        type=positive_int,
        default=None,
        help="federated: stop after this many rounds (continue with --resume)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument(
        "--budget-min", type=non_negative_float, default=None, help="wall-time budget in minutes"
    )
    seed_option(p, None, "default: the config's seed")
    device_option(p, None)
    p.set_defaults(func=cmd_train)

    p = command(
        sub,
        "sample",
        "sample class-conditional volumes from a generator",
        "synthct sample --generator pretrained --label nodule --n 8 --out samples",
        required=("generator", "label", "out"),
    )
    generator_option(p)
    p.add_argument("--label", help="class name from the generator's vocabulary")
    p.add_argument(
        "--site",
        default=None,
        help="render in this site's scanner style (site-conditioned generators; default: "
        "site-agnostic)",
    )
    p.add_argument("--n", type=positive_int, default=8, help="volumes to sample")
    p.add_argument("--out", help="folder for the volumes and their provenance JSON")
    sampling_options(p)
    seed_option(p)
    device_option(p)
    plugin_options(p)
    p.set_defaults(func=cmd_sample)

    p = command(
        sub,
        "generate",
        "generate a class-balanced synthetic cohort for what the real data lacks",
        "synthct generate --generator pretrained --data sites/manifest.csv --per-site --out cohort",
        required=("generator", "data", "out"),
    )
    generator_option(p)
    data_option(p, "its train counts per class (and site) set the deficit")
    renamed(p, "--reference", "--data", "data")
    p.add_argument(
        "--target",
        choices=["balanced"],
        default="balanced",
        help="what to fill up to: every class as common as the most common one",
    )
    p.add_argument("--counts", help="explicit targets instead: label=n,label=n")
    p.add_argument("--per-site", action="store_true", help="plan per site: each gets what it lacks")
    p.add_argument("--out", help="cohort folder (rerun the same command to resume)")
    sampling_options(p)
    p.add_argument("--batch-size", type=positive_int, default=8, help="volumes per batch")
    p.add_argument(
        "--format",
        choices=["nifti", "dicom"],
        default="nifti",
        help="one .nii.gz per case, or one CT series folder per case marked synthetic",
    )
    seed_option(p)
    device_option(p)
    plugin_options(p)
    p.set_defaults(func=cmd_generate)

    p = command(
        sub,
        "export-bundle",
        "write a generator as a MONAI bundle (metadata, inference config, hashed weights)",
        "synthct export-bundle --generator runs/gen --out bundles/gen",
        required=("generator", "out"),
    )
    generator_option(p)
    p.add_argument("--out", help="new (or empty) folder for the bundle")
    p.set_defaults(func=cmd_export_bundle)
