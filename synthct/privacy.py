"""One privacy account per site for everything a run released.

Each trained artifact keeps its own RDP account of its noised releases: the generator (every
phase listed in ``privacy.phases``, in ``generator/config.json``), the reference classifier
(``reference.json``) and the downstream classifiers (``results.json``, all arms and seeds).
A site's data fed all of them, so what the run cost a site is their sequential composition:
the epsilons add and the deltas add (an upper bound; tighter bounds need the RDP curves, which
the artifacts do not keep). An artifact trained without DP leaves the run without a bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from synthct.artifacts import read_json
from synthct.errors import SynthctError

__all__ = ["ACCOUNT_FILES", "artifact_privacy", "run_account", "describe_account"]

# artifact -> (the file in its folder, the ``kind`` that file declares)
ACCOUNT_FILES = {
    "generator": ("config.json", "generator"),
    "reference": ("reference.json", "reference-model"),
    "downstream": ("results.json", "synthct-downstream"),
}


def artifact_privacy(path: str | Path) -> tuple[str, dict[str, Any] | None]:
    """``(artifact, privacy record)`` of a generator, reference or downstream folder (or its
    record file); the record is None when the artifact was trained without DP."""
    path = Path(path)
    for artifact, (name, kind) in ACCOUNT_FILES.items():
        record_file = path / name if path.is_dir() else path
        if record_file.name != name or not record_file.is_file():
            continue
        try:
            document = read_json(record_file)
        except (ValueError, UnicodeDecodeError) as exc:
            raise SynthctError(f"{record_file}: not a readable JSON record ({exc})") from None
        if document.get("kind") != kind:
            continue
        holder = document.get("info", {}) if artifact == "reference" else document
        return artifact, holder.get("privacy")
    known = ", ".join(f"{a} ({name})" for a, (name, _) in ACCOUNT_FILES.items())
    raise SynthctError(f"{path}: not a trained artifact with a privacy record (expected {known})")


def run_account(records: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """The run's account per site from each artifact's record (name -> record or None)."""
    parts: dict[str, dict[str, Any] | None] = {}
    not_covered: list[str] = []
    partial: list[str] = []
    for name, record in records.items():
        released = record is not None and record.get("epsilon") is not None
        if released and not record.get("bounds_every_update", False):
            partial.append(name)  # some updates it released were not noised
        parts[name] = (
            {
                "epsilon": float(record["epsilon"]),
                "delta": float(record["delta"]),
                "releases": record.get("releases"),
            }
            if released
            else None
        )
        if released:
            not_covered += [f"{name}: {item}" for item in record.get("not_covered", [])]
    without = [name for name, part in parts.items() if part is None]
    bounded = bool(parts) and not without and not partial
    return {
        "composition": "sequential: the artifacts' epsilons and deltas add (an upper bound)",
        "partial": partial,
        "epsilon": sum(p["epsilon"] for p in parts.values() if p) if bounded else None,
        "delta": sum(p["delta"] for p in parts.values() if p) if bounded else None,
        "parts": parts,
        "without_dp": without,
        "not_covered": not_covered,
    }


def describe_account(account: dict[str, Any]) -> list[str]:
    """The account in plain lines: each artifact's (epsilon, delta), then the run's."""
    lines = []
    for name, part in account["parts"].items():
        if part is None:
            lines.append(f"{name}: no noised release (no epsilon)")
        else:
            only = " over its noised updates only" if name in account["partial"] else ""
            lines.append(
                f"{name}: epsilon {part['epsilon']:.3g} at delta {part['delta']:g} per site"
                f"{only} ({part['releases']} noised releases)"
            )
    if account["epsilon"] is None:
        why = [f"{n} released without noise" for n in account["without_dp"]]
        why += [f"{n} released some updates without noise" for n in account["partial"]]
        lines.append("the run: no privacy bound per site (" + "; ".join(why) + ")")
    else:
        lines.append(
            f"the run: epsilon {account['epsilon']:.3g} at delta {account['delta']:g} per site "
            "(the artifacts' accounts added)"
        )
    if account["not_covered"]:
        lines.append("not covered by any epsilon: " + "; ".join(account["not_covered"]))
    return lines
