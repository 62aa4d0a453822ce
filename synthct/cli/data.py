"""``synthct phantoms`` and ``synthct data check``: make phantom sites, validate a manifest."""

from __future__ import annotations

import argparse
from collections import Counter

from synthct.cli.options import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    command,
    config_options,
    group,
    run_config,
    seed_option,
)


def cmd_phantoms(args: argparse.Namespace) -> int:
    from synthct.data.phantoms import write_phantom_sites
    from synthct.progress import progress_bar

    config = run_config(args.config, args.set)
    with progress_bar("phantoms") as update:
        manifest = write_phantom_sites(config, args.out, seed=args.seed, progress=update)
    print(f"wrote {manifest}")
    return EXIT_OK


def cmd_data_check(args: argparse.Namespace) -> int:
    from synthct.data.manifest import check_manifest, read_manifest

    config = run_config(args.config, args.set) if args.config or args.set else None
    spacings: list[tuple[str, tuple]] = []
    problems = check_manifest(args.manifest, config, spacings=spacings)
    if problems:
        print(f"{args.manifest}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        return EXIT_BAD_INPUT
    rows = read_manifest(args.manifest)
    counts = Counter((r.site, r.split) for r in rows)
    print(f"{args.manifest}: OK, {len(rows)} volumes")
    for (site, split), n in sorted(counts.items()):
        print(f"  {site:>12} {split:>8}: {n}")
    if config is not None:
        from synthct.data.dataset import coarser_than_config, geometry_note

        coarse = [(p, s) for p, s in spacings if coarser_than_config(s, config)]
        if coarse:
            print(f"  warning: {geometry_note(args.manifest, coarse, len(rows), config)}")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this module's commands to ``synthct``: phantoms, data check."""
    p = command(
        sub,
        "phantoms",
        "write multi-site chest-CT phantoms (NIfTI) and their manifest.csv",
        "synthct phantoms --config demo --out sites",
        required=("out",),
    )
    config_options(p)
    p.add_argument("--out", help="output folder")
    seed_option(p, None, "default: the config's seed")
    p.set_defaults(func=cmd_phantoms)

    data_sub = group(sub, "data", "data utilities")
    q = command(
        data_sub,
        "check",
        "validate a manifest and its volumes, reporting every problem at once",
        "synthct data check sites/manifest.csv --config demo",
    )
    q.add_argument("manifest", help="manifest CSV")
    config_options(q, "the vocabulary, label maps and geometry")
    q.set_defaults(func=cmd_data_check)
