"""``synthct plugin train|add|list``: a site's LoRA plugin and the registry that serves it."""

from __future__ import annotations

import argparse
import sys

from synthct.cli.options import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    chosen_device,
    command,
    data_option,
    device_option,
    generator_dir,
    generator_option,
    group,
    positive_int,
    seed_option,
)


def cmd_plugin_train(args: argparse.Namespace) -> int:
    from synthct.checkpoint import load_generator
    from synthct.data.dataset import load_cases
    from synthct.plugins.adapter import export_plugin, train_plugin
    from synthct.progress import progress_bar

    device = chosen_device(args)
    gen_dir = generator_dir(args.generator)
    gen = load_generator(gen_dir)
    cfg = gen.config.plugins.model_copy(
        update={
            k: v
            for k, v in (("rank", args.rank), ("steps", args.steps), ("targets", args.targets))
            if v
        }
    )
    cases = load_cases(args.data, gen.config, splits=("train",), sites=(args.site,))
    if len(cases) == 0:
        print(f"synthct: error: {args.data}: no train cases of site {args.site!r}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with progress_bar(f"plugin {args.site}", cfg.steps) as update:
        unet = train_plugin(gen, cases, cfg, seed=args.seed, progress=update, device=device)
    out = export_plugin(
        unet, args.out, gen=gen, generator_dir=gen_dir, site=args.site, cases=cases, cfg=cfg
    )
    size = (out / "plugin.safetensors").stat().st_size
    print(f"plugin: {out} ({size / 1024:.0f} KiB)")
    return EXIT_OK


def cmd_plugin_add(args: argparse.Namespace) -> int:
    from synthct.checkpoint import load_generator
    from synthct.plugins.registry import add_plugin

    gen_dir = generator_dir(args.generator)
    plugin = add_plugin(args.registry, args.plugin, load_generator(gen_dir), gen_dir)
    print(f"registered {plugin.name} in {args.registry}")
    return EXIT_OK


def cmd_plugin_list(args: argparse.Namespace) -> int:
    from synthct.plugins.registry import list_plugins

    for row in list_plugins(args.registry):
        seen = ", ".join(f"{k}:{v}" for k, v in row["classes_seen"].items() if v)
        print(
            f"{row['name']}  site={row['site']} rank={row['rank']} {row['targets']} "
            f"{row['weights_bytes'] / 1024:.0f} KiB  classes {seen}  ({row['created']})"
        )
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this module's commands to ``synthct``: plugin train|add|list."""
    plug = group(sub, "plugin", "site LoRA plugins: train, register, list")
    q = command(
        plug,
        "train",
        "train a LoRA plugin on one site's data (the base generator stays frozen)",
        "synthct plugin train --generator pretrained --site site_e --data e/manifest.csv "
        "--out plugins/site_e",
        required=("generator", "site", "data", "out"),
    )
    generator_option(q, "base generator")
    q.add_argument("--site", help="the site whose train cases the plugin learns")
    data_option(q, "holds the site's train cases")
    q.add_argument("--out", help="plugin folder")
    q.add_argument("--rank", type=positive_int, default=None, help="LoRA rank (default: config)")
    q.add_argument(
        "--steps", type=positive_int, default=None, help="training steps (default: config)"
    )
    q.add_argument(
        "--targets",
        choices=["conv+linear", "attention+time"],
        default=None,
        help="which UNet layers get adapters (default: config)",
    )
    seed_option(q)
    device_option(q)
    q.set_defaults(func=cmd_plugin_train)
    q = command(
        plug,
        "add",
        "validate a plugin (hashes, base generator, shapes) and add it to a registry folder",
        "synthct plugin add plugins/registry plugins/site_e --generator pretrained",
        required=("generator",),
    )
    q.add_argument("registry", help="registry folder (made if missing)")
    q.add_argument("plugin", help="plugin folder made by `synthct plugin train`")
    generator_option(q, "the base generator the registry serves")
    q.set_defaults(func=cmd_plugin_add)
    q = command(
        plug, "list", "list the plugins in a registry", "synthct plugin list plugins/registry"
    )
    q.add_argument("registry", help="registry folder")
    q.set_defaults(func=cmd_plugin_list)
