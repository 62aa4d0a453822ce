"""The generator stage: train the latent-diffusion generator on the sites' ``train`` cases,
federatedly (Flower's simulation, only weights leave a site) or on the pooled split.

The command line (``synthct train``) and the demo both train here; the demo fine-tunes the
shipped generator (``initial``), the command line trains what its config asks for.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from synthct.checkpoint import Generator
from synthct.config import SynthctConfig
from synthct.errors import UsageError

__all__ = ["train_generator", "federated_summary", "matching_pretrained"]


def matching_pretrained(config: SynthctConfig) -> Path | None:
    """The shipped phantom generator's folder if its networks fit ``config`` (so a run can
    fine-tune it instead of starting from scratch), else None."""
    from synthct.checkpoint import generator_config
    from synthct.pretrained import phantom_dir

    path = phantom_dir() / "generator"
    if not (path / "config.json").is_file():
        return None
    return path if config.network_mismatch(generator_config(path)) is None else None


def train_generator(
    config: SynthctConfig,
    manifest: str | Path,
    run: str | Path,
    *,
    federated: bool = True,
    resume: bool = False,
    budget_min: float | None = None,
    max_rounds: int | None = None,
    initial: str | Path | None = None,
    progress: Callable[..., None] | None = None,
) -> Generator:
    """Train (or, with ``resume``, continue) the generator in ``run``; ``RUN/generator`` holds
    it. ``max_rounds`` and ``initial`` (continue that generator folder) are federated options;
    ``progress(phase, done, total, **metrics)`` reports every round (federated) or step."""
    if federated:
        from synthct.fed.simulation import train_federated

        return train_federated(
            config,
            manifest,
            run,
            resume=resume,
            budget_min=budget_min,
            max_rounds=max_rounds,
            initial=initial,
            progress=progress,
        )
    if max_rounds is not None or initial is not None:
        raise UsageError("--max-rounds and an initial generator are federated options")
    from synthct.trainer import train_central

    return train_central(
        config, manifest, run, resume=resume, budget_min=budget_min, progress=progress
    )


def federated_summary(run: str | Path) -> dict[str, Any]:
    """From ``RUN/rounds.jsonl``: the training rounds run and the last round's per-site loss
    and bytes sent (what the demo reports)."""
    lines = (Path(run) / "rounds.jsonl").read_text().splitlines()
    trained = [r for r in map(json.loads, lines) if r["phase"] not in ("scale", "noise")]
    last = trained[-1] if trained else {"sites": []}
    return {
        "rounds": len(trained),
        "last_losses": {s["site"]: s["loss"] for s in last["sites"]},
        "bytes_per_round_per_site": max((s["bytes_up"] for s in last["sites"]), default=0),
    }
