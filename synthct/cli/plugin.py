"""``synthct plugin train|add|list|contribute|move-base``: a site's LoRA plugin and the
registry that serves it."""

from __future__ import annotations

import argparse

from synthct.cli.options import (
    EXIT_GATE_FAILED,
    EXIT_OK,
    chosen_device,
    command,
    config_options,
    data_option,
    device_option,
    gate_reference,
    generator_dir,
    generator_option,
    group,
    non_negative_int,
    positive_int,
    run_config,
    seed_option,
)


def cmd_plugin_train(args: argparse.Namespace) -> int:
    from synthct.pipeline.plugin import train_plugin
    from synthct.progress import progress_bar

    out = train_plugin(
        generator_dir(args.generator),
        args.data,
        args.site,
        args.out,
        settings={
            "rank": args.rank,
            "steps": args.steps,
            "targets": args.targets,
            "decoder_rank": args.decoder_rank,
            "decoder_steps": args.decoder_steps,
        },
        rebase_from=args.rebase_from,
        seed=args.seed,
        device=chosen_device(args),
        progress=progress_bar,
    )
    size = (out / "plugin.safetensors").stat().st_size
    print(f"plugin: {out} ({size / 1024:.0f} KiB)")
    return EXIT_OK


def cmd_plugin_add(args: argparse.Namespace) -> int:
    from synthct.checkpoint import load_generator
    from synthct.plugins.registry import PluginError, add_plugin

    if not args.ungated:
        raise PluginError(
            f"{args.plugin} would enter {args.registry} without the gate's "
            "judgement. Send it through `synthct plugin contribute` (the gate judges it on its "
            "site's data), or pass --ungated to vouch for it yourself (recorded in the registry)"
        )
    gen_dir = generator_dir(args.generator)
    plugin = add_plugin(
        args.registry,
        args.plugin,
        load_generator(gen_dir),
        gen_dir,
        acceptance={"gated": False, "accepted": True, "why": "added by hand with --ungated"},
    )
    print(f"registered {plugin.name} in {args.registry} (ungated: nobody judged it)")
    return EXIT_OK


def cmd_plugin_list(args: argparse.Namespace) -> int:
    from synthct.plugins.registry import list_plugins

    for row in list_plugins(args.registry):
        seen = ", ".join(f"{k}:{v}" for k, v in row["classes_seen"].items() if v)
        status = row["status"] + (f" -> {row['replaced_by']}" if "replaced_by" in row else "")
        status += ", gated" if row["gated"] else ", ungated"
        print(
            f"{row['name']}  [{status}]  site={row['site']} rank={row['rank']} {row['targets']} "
            f"{row['weights_bytes'] / 1024:.0f} KiB  classes {seen}  ({row['created']}, "
            f"by {row['by']}, version {row['version']})"
        )
    return EXIT_OK


def cmd_plugin_contribute(args: argparse.Namespace) -> int:
    from synthct.fed.plugin_app import PluginGate, contribute_plugin

    gen_dir = generator_dir(args.generator)
    if args.config is None and not args.set:
        from synthct.checkpoint import load_generator

        config = load_generator(gen_dir).config
    else:
        config = run_config(args.config, args.set)
    gate = None
    if args.accept == "gate":
        from synthct.eval.gate import load_rules

        gate = PluginGate(
            gate_reference(args.reference_model, config),
            load_rules(args.rules),
            cases_per_class=args.gate_cases,
            bootstrap=args.bootstrap,
        )
    result = contribute_plugin(
        config,
        args.data,
        site=args.site,
        generator_dir=gen_dir,
        registry=args.registry,
        run=args.out,
        seed=args.seed,
        steps=args.steps or 0,
        decoder_rank=args.decoder_rank or 0,
        gate=gate,
    )
    decision = result["decision"]
    verb = "contributed" if decision["accepted"] else "was REFUSED for"
    print(
        f"site {result['site']} {verb} {result['plugin']} ({result['bytes'] / 1024:.0f} KiB, "
        f"through Flower): {decision['why']}; registry {result['registry']}"
    )
    return EXIT_OK if decision["accepted"] else EXIT_GATE_FAILED


def cmd_plugin_move_base(args: argparse.Namespace) -> int:
    from synthct.plugins.registry import move_base

    stale = move_base(args.registry, generator_dir(args.generator))
    print(
        f"{args.registry} now serves {args.generator}; stale until re-fitted "
        f"(synthct plugin train --rebase-from): {', '.join(stale) or 'none'}"
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
    q.add_argument(
        "--decoder-rank",
        type=non_negative_int,
        default=None,
        help="> 0: also a LoRA adapter of this rank on the decoder, trained to reconstruct "
        "the site's own scans (its scanner style); 0: UNet only (default: config)",
    )
    q.add_argument(
        "--decoder-steps",
        type=positive_int,
        default=None,
        help="decoder adapter training steps (default: config)",
    )
    q.add_argument(
        "--rebase-from",
        metavar="PLUGIN",
        help="re-fit this (stale) plugin of the same site on the new base: its settings and "
        "weights are the start, --steps the length",
    )
    seed_option(q)
    device_option(q)
    q.set_defaults(func=cmd_plugin_train)
    q = command(
        plug,
        "add",
        "validate a plugin (hashes, base generator, shapes) and add it to a registry folder "
        "without the gate (--ungated; `plugin contribute` gates it)",
        "synthct plugin add plugins/registry plugins/site_e --generator pretrained --ungated",
        required=("generator",),
    )
    q.add_argument("registry", help="registry folder (made if missing)")
    q.add_argument("plugin", help="plugin folder made by `synthct plugin train`")
    generator_option(q, "the base generator the registry serves")
    q.add_argument(
        "--ungated",
        action="store_true",
        help="required: add it without the gate's judgement (recorded as ungated)",
    )
    q.set_defaults(func=cmd_plugin_add)
    q = command(
        plug, "list", "list the plugins in a registry", "synthct plugin list plugins/registry"
    )
    q.add_argument("registry", help="registry folder")
    q.set_defaults(func=cmd_plugin_list)
    q = command(
        plug,
        "contribute",
        "a site trains its plugin and sends it through a Flower round into the registry "
        "(Flower's simulation; deployed: flwr run APP --run-config \"task='plugin' ...\")",
        "synthct plugin contribute plugins/registry --generator pretrained --site site_e "
        "--data e/manifest.csv --out runs/contribute_e",
        required=("generator", "site", "data", "out"),
    )
    q.add_argument("registry", help="registry folder (made if missing)")
    generator_option(q, "the base generator the registry serves")
    q.add_argument("--site", help="the contributing site (in the config's sites)")
    data_option(q, "holds the site's train cases")
    q.add_argument("--out", help="run folder (the site's audit log, Flower's temp files)")
    q.add_argument(
        "--steps", type=positive_int, default=None, help="training steps (default: config)"
    )
    q.add_argument(
        "--decoder-rank",
        type=non_negative_int,
        default=None,
        help="> 0: the plugin also carries a decoder adapter of this rank (default: config)",
    )
    q.add_argument(
        "--accept",
        choices=["gate", "none"],
        default="gate",
        help="gate: the base with the plugin fused in makes a cohort for the site, and the "
        "plugin is added only if the federated gate passes it; none: added unjudged (the "
        "registry records that)",
    )
    q.add_argument(
        "--reference-model",
        metavar="DIR",
        help="the gate's reference models (default: the shipped phantom reference)",
    )
    q.add_argument("--rules", metavar="YAML", help="gate rule overrides (as for synthct gate)")
    q.add_argument(
        "--gate-cases", type=positive_int, default=8, help="cases per class the gate judges"
    )
    q.add_argument("--bootstrap", type=positive_int, default=100, help="gate bootstrap draws")
    config_options(q, "the sites", default="the generator's own config")
    seed_option(q)
    q.set_defaults(func=cmd_plugin_contribute)
    q = command(
        plug,
        "move-base",
        "serve a new base generator: plugins trained on the old one become stale (kept, never "
        "merged, until re-fitted with plugin train --rebase-from)",
        "synthct plugin move-base plugins/registry --generator runs/new",
        required=("generator",),
    )
    q.add_argument("registry", help="registry folder")
    generator_option(q, "the new base generator")
    q.set_defaults(func=cmd_plugin_move_base)
