"""The evidence the gate's defaults are judged against: cohorts of known downstream effect.

``gate_calibration.json`` ships with synthct. ``bench/gate_calibration.py --package`` writes it
from the dose-response bench (``bench/gate_dose_response.py``): cohorts degraded along each
axis the gate watches, each with every rule's value and the change it made to a converged
classifier on a calibration set of fresh phantoms that no model or stopping rule saw. Each
entry is the mean over seeds, classed ``harm``, ``neutral`` or ``help`` against the seed-noise
band. The report draws it, so a reader sees where a cohort sits among cohorts that harmed and
cohorts that helped (``synthct.report_harm``).
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any

from synthct.artifacts import read_json

__all__ = ["CALIBRATION_FILE", "load_calibration"]

CALIBRATION_FILE = "gate_calibration.json"


def load_calibration(path: str | Path | None = None) -> dict[str, Any] | None:
    """The shipped calibration (or the one at ``path``); None if none ships."""
    source = Path(path) if path is not None else Path(str(files("synthct.eval") / CALIBRATION_FILE))
    return read_json(source) if source.is_file() else None
