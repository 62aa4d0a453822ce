"""What every ``synthct`` command shares: exit codes, argument types, option builders, the
help layout, and how a command finds its config, device and generator folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from synthct.errors import UsageError

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_GATE_FAILED = 0, 1, 2, 3
EXIT_TEXT = (
    "exit codes:\n"
    "  0  done\n"
    "  1  an unexpected error (a bug: please report it with the traceback)\n"
    "  2  a mistake in the input: one line naming the argument or file (--debug: traceback)"
)
OLD_NAMES_UNTIL = "0.3"


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (counts, steps, batch sizes, rounds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: a whole number >= 0 (a rank where 0 means none)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 0")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (guidance scale, minutes)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def run_config(path: str | None, overrides: list[str] | None = None):
    """The config a command runs under: ``--config`` (a path or a packaged name; default
    demo) with its ``--set KEY=VALUE`` overrides, validated together."""
    from synthct.config import load_config

    return load_config(path or "demo", overrides)


def config_options(
    p: argparse.ArgumentParser, what: str = "the run's settings", default: str = "demo"
) -> None:
    p.add_argument(
        "--config",
        metavar="YAML|NAME",
        help=f"config for {what}: a YAML path or a packaged name (demo, smoke); default {default}",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.batch_size=2 (repeatable; validated "
        "like the file)",
    )


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and appends every option's default to its help line."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or default == []
        ):
            return text
        return f"{text} (default: %(default)s)"


class RenamedOption(argparse.Action):
    """An option's old name, kept for one release: stores into the new option and says so."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(
            f"synthct: notice: {option_string} is now {self.new}; the old name works until "
            f"synthct {OLD_NAMES_UNTIL}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def renamed(p: argparse.ArgumentParser, old: str, new: str, dest: str) -> None:
    p.add_argument(old, dest=dest, action=RenamedOption, new=new, help=argparse.SUPPRESS)


def command(
    sub,
    name: str,
    summary: str,
    example: str,
    *,
    exits: str = "",
    required: tuple[str, ...] = (),
) -> argparse.ArgumentParser:
    """A subcommand whose help says what it does, shows an example and its exit codes.
    ``required``: options that must be given (checked after parsing, so an option's old name
    still satisfies it)."""
    p = sub.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog=f"example:\n  {example}\n\n{EXIT_TEXT}{exits}",
        formatter_class=HelpFormatter,
    )
    p.set_defaults(required_options=required, command_parser=p)
    return p


def group(sub, name: str, summary: str) -> argparse._SubParsersAction:
    p = sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
    return p.add_subparsers(dest=f"{name}_command", required=True, metavar="SUBCOMMAND")


def generator_option(p: argparse.ArgumentParser, what: str = "generator to sample") -> None:
    p.add_argument(
        "--generator",
        metavar="DIR|RUN|pretrained",
        help=f"{what}: a generator folder, a training run (its generator/), or 'pretrained' "
        "(the shipped phantom generator)",
    )
    renamed(p, "--run", "--generator", "generator")


def data_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--data", metavar="MANIFEST", help=f"real-data manifest CSV: {what}")


def seed_option(p: argparse.ArgumentParser, default: int | None = 0, what: str = "") -> None:
    p.add_argument(
        "--seed",
        type=int,
        default=default,
        help="random seed" + (f" ({what})" if what else ""),
    )


def device_option(p: argparse.ArgumentParser, default: str | None = "auto", what: str = "") -> None:
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=default,
        help="where the networks run"
        + (f", for {what}" if what else "")
        + "; auto takes CUDA when there is one"
        + ("" if default else " (default: the config's train.device)"),
    )


def chosen_device(args: argparse.Namespace, *, federated: bool = False):
    """The torch device ``--device`` names (cuda without CUDA is refused); federated sites
    run on CPU in the simulation, so asking for cuda there is refused too."""
    from synthct.training import resolve_device

    if federated and args.device == "cuda":
        raise UsageError("--device cuda: federated sites train on CPU in the simulation")
    return resolve_device("cpu" if federated else args.device)


def sampling_options(p: argparse.ArgumentParser) -> None:
    """Sampler, steps and guidance; each defaults to the generator's own inference settings."""
    from synthct.config import SAMPLERS  # pydantic only: --help stays fast

    p.add_argument(
        "--sampler", choices=SAMPLERS, default=None, help="sampler (default: the generator's)"
    )
    p.add_argument(
        "--steps", type=positive_int, default=None, help="sampling steps (default: the generator's)"
    )
    p.add_argument(
        "--guidance",
        type=non_negative_float,
        default=None,
        help="classifier-free guidance scale for every class (default: the generator's own, "
        "per class where it has per-class scales)",
    )
    p.add_argument(
        "--no-scanner-noise",
        dest="scanner_noise",
        action="store_false",
        default=None,
        help="leave out the target sites' scanner noise (default: the generator's setting; "
        "only generators that measured it add any)",
    )


def plugin_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugins", metavar="REGISTRY", help="apply this plugin registry")
    p.add_argument(
        "--merge",
        choices=["fusion", "mixture"],
        default="fusion",
        help="how plugins combine: merged weights (fusion) or mixed predictions (mixture)",
    )
    p.add_argument(
        "--fit-weights",
        metavar="MANIFEST",
        help="fit the merge weights on this manifest's train cases (default: case counts)",
    )


def gate_reference(path: str | None, config):  # noqa: ANN001, ANN201 - config, ReferenceModel
    """``--reference-model DIR`` for ``config``'s label vocabulary, or the shipped phantom
    reference (the gate's models, for ``gate`` and ``plugin contribute`` alike)."""
    if path:
        from synthct.reference import load_reference

        return load_reference(path, vocabulary_hash=config.labels.vocabulary_hash)
    from synthct.pretrained import load_phantom_reference

    return load_phantom_reference(config.labels.vocabulary_hash)


def generator_dir(run: str) -> Path:
    """``RUN`` (its ``generator/``), a generator folder itself, or ``pretrained``."""
    from synthct.pretrained import generator_folder

    return generator_folder(run)
