"""Shared by the bench scripts: the demo phantoms rendered once under a run folder, and the
command line a result file records."""

from __future__ import annotations

import argparse
from pathlib import Path

from synthct.config import SynthctConfig
from synthct.data.dataset import CaseSet, load_cases
from synthct.data.phantoms import write_phantom_sites


def phantom_manifest(config: SynthctConfig, out: Path, *, seed: int | None = None) -> Path:
    """``out/data/manifest.csv``, rendering the config's phantom sites there if missing."""
    manifest = out / "data" / "manifest.csv"
    if not manifest.is_file():
        write_phantom_sites(config, out / "data", seed=seed)
    return manifest


def phantom_world(
    config: SynthctConfig, out: Path, *, seed: int | None = None
) -> tuple[Path, CaseSet, CaseSet]:
    """The phantoms' manifest and their ``train`` and ``holdout`` cases."""
    manifest = phantom_manifest(config, out, seed=seed)
    train = load_cases(manifest, config, splits=("train",))
    holdout = load_cases(manifest, config, splits=("holdout",))
    return manifest, train, holdout


def bench_command(
    script: str, args: argparse.Namespace, *, positional: tuple[str, ...] = ()
) -> str:
    """The command that reproduces a run: ``python bench/SCRIPT [positional ...] --option value
    ...``; ``positional`` names the arguments written first, bare (options left at None or
    False are omitted; a flag set to True is written bare)."""

    def bare(v) -> str:
        return " ".join(map(str, v)) if isinstance(v, list | tuple) else str(v)

    def option(k: str, v) -> str:
        flag = f"--{k.replace('_', '-')}"
        return flag if v is True else f"{flag} {bare(v)}"

    given = vars(args)
    words = [bare(given[k]) for k in positional] + [
        option(k, v)
        for k, v in given.items()
        if k not in positional and v is not None and v is not False
    ]
    return " ".join([f"python bench/{script}", *words])
