"""The generator's training phases and the one loop that runs them, central or federated.

Phases run in order: autoencoder -> decoder (encoder frozen) -> diffusion, then ``done``. A
*unit* is one optimiser step (central training) or one federated round. The loop here owns the
order, the unit numbering, when a phase ends and when the run stops; a driver owns what one
unit does, what a phase needs when it starts and ends, and how a finished unit is committed
(log line, checkpoint, state file), so a stopped run resumes at its last committed unit in
both modes, and a finished run given more diffusion units continues.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Protocol

__all__ = ["PHASES", "DONE", "Next", "PhasePosition", "PhaseDriver", "run_phases"]

PHASES = ("autoencoder", "decoder", "diffusion")
DONE = "done"


class Next(Enum):
    """What the loop does after a unit."""

    CONTINUE = "continue"
    END_PHASE = "end_phase"  # this phase is over (e.g. its share of a wall-time budget)
    STOP = "stop"  # the run stops here, resumably (a budget, a unit cap)


class PhasePosition:
    """Where a run is: its phase and the units of that phase committed so far (at ``done``,
    the diffusion units run, so more can be added)."""

    def __init__(self) -> None:
        self.phase: str = PHASES[0]
        self.unit: int = 0


class PhaseDriver(Protocol):
    """What a training mode supplies to :func:`run_phases`."""

    position: PhasePosition

    def total(self, phase: str) -> int:
        """Units the phase runs in all (steps or rounds)."""
        ...

    def start(self, phase: str) -> None:
        """Before this session's first unit of ``phase`` (optimisers, EMA, latents)."""
        ...

    def unit(self, phase: str, index: int) -> tuple[dict[str, Any] | None, Next]:
        """Run unit ``index`` (1-based) of ``phase``: its record, or None when nothing ran
        (a stop decided before the unit), and what comes next."""
        ...

    def commit(self, phase: str, record: dict[str, Any]) -> None:
        """After a unit ran and ``position`` names it: log, checkpoint, report."""
        ...

    def end(self, phase: str) -> None:
        """After ``phase`` is over and ``position`` has moved on: hand-over work, commit."""
        ...


def run_phases(driver: PhaseDriver) -> bool:
    """Run ``driver`` from its position to ``done``: True when every phase finished, False
    when a unit asked the run to stop (resume continues from the last commit)."""
    pos = driver.position
    last = PHASES[-1]
    if pos.phase == DONE and pos.unit < driver.total(last):
        pos.phase = last  # the config asks for more diffusion units: extend the run
    while pos.phase != DONE:
        phase = pos.phase
        driver.start(phase)
        total = driver.total(phase)
        while pos.unit < total:
            record, then = driver.unit(phase, pos.unit + 1)
            if record is not None:
                pos.unit += 1
                driver.commit(phase, record)
            if then is Next.STOP:
                return False
            if then is Next.END_PHASE:
                break
        following = PHASES[PHASES.index(phase) + 1] if phase != last else DONE
        # at done the unit count stays: a later, longer schedule continues from it
        pos.phase, pos.unit = following, (pos.unit if following == DONE else 0)
        driver.end(phase)
    return True
