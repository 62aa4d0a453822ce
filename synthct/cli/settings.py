"""``synthct config show|memory|validate``: a config as validated, and what it will cost."""

from __future__ import annotations

import argparse

from synthct.cli.options import EXIT_OK, command, config_options, group, run_config


def cmd_config_show(args: argparse.Namespace) -> int:
    """The whole validated config (every default filled in) as YAML."""
    import yaml

    config = run_config(args.config, args.set)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return EXIT_OK


def cmd_config_memory(args: argparse.Namespace) -> int:
    """Estimated accelerator memory per phase of a config (measured on the meta device)."""
    from synthct.models.memory import estimate_memory

    config = run_config(args.config, args.set)
    rows = estimate_memory(config, batch_size=args.batch_size)
    print(
        f"{'phase':<14} {'batch':>5} {'input':<18} {'weights':>9} {'AdamW':>9} "
        f"{'activations':>12} {'total MiB':>10}"
    )
    for r in rows:
        shape = "x".join(str(v) for v in r.shape)
        print(
            f"{r.phase:<14} {r.batch:>5} {shape:<18} {r.weights_mib:>9.1f} "
            f"{r.optimizer_mib:>9.1f} {r.activations_mib:>12.1f} {r.total_mib:>10.1f}"
        )
    print(
        "fp32; bf16 autocast roughly halves activations; add the CUDA context (~0.4 GiB) "
        "and ~25 % for the allocator"
    )
    return EXIT_OK


def cmd_config_validate(args: argparse.Namespace) -> int:
    config = run_config(args.config, args.set)
    sites = ", ".join(config.site_names) or "none"
    print(
        f"{args.config}: OK ({config.data.shape} voxels, classes {config.labels.classes}, sites {sites})"
    )
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this module's commands to ``synthct``: config show|memory|validate."""
    cfg_sub = group(sub, "config", "show or validate a config")
    q = command(
        cfg_sub,
        "show",
        "print the whole validated config, defaults filled in, as YAML",
        "synthct config show --config demo --set train.batch_size=2",
    )
    config_options(q)
    q.set_defaults(func=cmd_config_show)
    q = command(
        cfg_sub,
        "memory",
        "estimate the accelerator memory each phase of a config needs (nothing allocated)",
        "synthct config memory --config chest128",
    )
    config_options(q)
    q.add_argument(
        "--batch-size", type=int, default=None, help="batch (default: the config's batches)"
    )
    q.set_defaults(func=cmd_config_memory)
    q = command(
        cfg_sub,
        "validate",
        "check a config (and --set overrides)",
        "synthct config validate my.yaml",
    )
    q.add_argument("config", metavar="YAML|NAME", help="a YAML path or a packaged name")
    q.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value (repeatable)",
    )
    q.set_defaults(func=cmd_config_validate)
