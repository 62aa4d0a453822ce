"""The ``synthct`` command line: a thin layer over the library, one module per group of
commands (``generator``, ``plugin``, ``evaluation``, ``data``, ``security``, ``settings``) and
their shared option builders (``options``). Heavy imports (torch, MONAI, Flower) happen inside
commands, so ``--help`` and argument mistakes are answered at once."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from synthct import __version__
from synthct.cli import data, evaluation, generator, plugin, security, settings
from synthct.cli.options import (
    EXIT_BAD_INPUT,
    EXIT_ERROR,
    EXIT_GATE_FAILED,
    EXIT_OK,
    EXIT_TEXT,
    OLD_NAMES_UNTIL,
    HelpFormatter,
    chosen_device,
    command,
    config_options,
    device_option,
    generator_dir,
    seed_option,
)
from synthct.errors import UsageError

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_ERROR",
    "EXIT_GATE_FAILED",
    "EXIT_OK",
    "build_parser",
    "main",
]

logger = logging.getLogger("synthct")


def cmd_demo(args: argparse.Namespace) -> int:
    from synthct.demo import run_demo

    return run_demo(args, device=chosen_device(args))


def build_parser() -> argparse.ArgumentParser:
    """Every command, in the order ``synthct --help`` lists them."""
    parser = argparse.ArgumentParser(
        prog="synthct",
        description="Train a 3D latent-diffusion CT generator across hospitals, generate\n"
        "class-balanced synthetic cohorts, gate them, and measure what they change downstream.",
        epilog="every command: synthct COMMAND --help\n\n" + EXIT_TEXT,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"synthct {__version__}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="library log level",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback behind an error message"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = command(
        sub,
        "demo",
        "end-to-end demo on the embedded phantom sites: train, generate, gate, downstream, plugin",
        "synthct demo --out runs/demo",
    )
    p.add_argument("--out", default="runs/demo", help="run folder")
    config_options(p)
    seed_option(p, None, "default: the config's seed")
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="train the generator from zero instead of fine-tuning the shipped one",
    )
    device_option(p, "auto", "the cohort, the gate and the site plugin (federated stages: CPU)")
    p.set_defaults(func=cmd_demo)

    for group in (generator, plugin, evaluation, data, settings, security):
        group.add_commands(sub)
    return parser


def _check_required(args: argparse.Namespace) -> None:
    """Options a command needs, checked after parsing so an old option name counts too."""
    missing = [
        "--" + dest.replace("_", "-")
        for dest in getattr(args, "required_options", ())
        if getattr(args, dest, None) is None
    ]
    if missing:
        args.command_parser.error("the following arguments are required: " + ", ".join(missing))


def _check_out(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` of the wrong kind before any work (a folder where a file is written,
    or a file where a folder is), so no result is computed only to be lost."""

    out = getattr(args, "out", None)
    if out is None:
        return
    path = Path(out)
    if args.func is evaluation.cmd_gate and out.endswith(".json"):
        print(
            f"synthct: notice: --out {out}: a report file name is the old form; --out now names "
            f"a folder (gate.json is written in it), the old form works until synthct "
            f"{OLD_NAMES_UNTIL}",
            file=sys.stderr,
        )
        if path.is_dir():
            raise UsageError(f"--out {out}: is a folder; give a folder for gate.json, e.g. {out}")
    elif path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")


def _check_inputs(args: argparse.Namespace) -> None:
    """Input paths named on the command line exist and are of the right kind, checked before a
    command imports torch, so a mistyped path is answered at once (with the message the
    loaders give)."""
    from synthct.data.manifest import require_manifest_file

    data = getattr(args, "data", None)
    if data:
        require_manifest_file(Path(data))
    generator = getattr(args, "generator", None)
    if generator and generator != "pretrained":
        record = generator_dir(generator) / "config.json"
        if not record.is_file():
            raise UsageError(f"{record}: no generator here (config.json missing)")
    if args.func is plugin.cmd_plugin_list and not Path(args.registry).is_dir():
        raise UsageError(f"{args.registry}: no plugin registry there (not a folder)")


def main(argv: list[str] | None = None) -> int:
    from synthct.errors import SynthctError  # light: --help and argument errors stay fast

    parser = build_parser()
    args = parser.parse_args(argv)
    _check_required(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_out(args)
        _check_inputs(args)
        return int(args.func(args))
    except SynthctError as exc:
        if args.debug:
            raise
        print(f"synthct: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("synthct: interrupted; completed work is kept on disk", file=sys.stderr)
        return 130
