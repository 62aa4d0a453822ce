"""The cohort stage: from a generator folder and the sites' real manifest, the synthetic cases
the data lacks (pooled, or per site so each site gets the classes it is short of), written as a
cohort folder with its manifest and provenance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from synthct.checkpoint import Generator, load_generator
from synthct.cohort import PlannedCase, generate_cohort, plan_cohort, reference_counts

__all__ = ["Cohort", "make_cohort"]


@dataclass(frozen=True)
class Cohort:
    """A cohort stage's result: its manifest (None when the data lacked nothing) and the plan
    it sampled."""

    manifest: Path | None
    plan: list[PlannedCase]


def make_cohort(
    generator_dir: str | Path,
    real_manifest: str | Path,
    out: str | Path,
    *,
    gen: Generator | None = None,
    target: str | dict[str, int] = "balanced",
    per_site: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
    **sampling: Any,
) -> Cohort:
    """Plan what ``real_manifest``'s sites lack against ``target`` (``balanced`` or counts per
    class) and sample it from the generator (``gen``: already loaded, e.g. with plugins merged);
    ``sampling``: :func:`synthct.cohort.generate_cohort`'s options. Resumes a partial cohort."""
    gen = gen if gen is not None else load_generator(generator_dir, device)
    classes = list(gen.config.labels.classes)
    plan = plan_cohort(
        reference_counts(real_manifest, gen.config), classes, target=target, per_site=per_site
    )
    if not plan:
        return Cohort(None, plan)
    manifest = generate_cohort(gen, generator_dir, plan, out, seed=seed, device=device, **sampling)
    return Cohort(manifest, plan)
