"""Tamper-evident audit logs: each record carries the hash of the chain before it.

A site records what leaves it (before it is sent) one JSON line per message. Each line holds
``prev`` (the previous line's ``chain``, 64 zeros for the first) and ``chain`` = sha256 of
``prev`` + the record's canonical JSON (sorted keys, without ``chain``). Editing, inserting or
removing a record breaks every ``chain`` from there on, so :func:`verify_chain` names the first
record that no longer fits. (Cutting records off the end leaves a valid shorter chain: the head
``chain`` a site reports or keeps elsewhere pins the length.)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from synthct.errors import SynthctError

__all__ = ["AuditError", "GENESIS", "append_chained", "verify_chain"]

GENESIS = "0" * 64


class AuditError(SynthctError, ValueError):
    """An audit log is unreadable or its hash chain is broken; the message names the record."""


def _chain(prev: str, record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "chain"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256((prev + canonical).encode("utf-8")).hexdigest()


def _last_chain(path: Path) -> str:
    if not path.is_file() or path.stat().st_size == 0:
        return GENESIS
    with open(path, "rb") as fh:  # the last line only: logs grow for the life of a federation
        fh.seek(max(0, path.stat().st_size - 65536))
        tail = fh.read().decode("utf-8").rstrip("\n").rsplit("\n", 1)[-1]
    try:
        return str(json.loads(tail)["chain"])
    except (ValueError, KeyError) as exc:
        raise AuditError(
            f"{path}: last record has no chain hash ({exc}); run `synthct audit verify`"
        ) from None


def append_chained(path: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Append ``record`` to the chained log at ``path``; returns it with ``prev``/``chain``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prev = _last_chain(path)
    chained = {**{k: v for k, v in record.items() if k not in ("prev", "chain")}, "prev": prev}
    chained["chain"] = _chain(prev, chained)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(chained, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return chained


def verify_chain(path: str | Path) -> tuple[int, str]:
    """(records, head chain hash) of an intact log; AuditError naming the first bad record."""
    path = Path(path)
    if not path.is_file():
        raise AuditError(f"{path}: no audit log there")
    prev, count = GENESIS, 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            raise AuditError(f"{path}: record {number} is not JSON (edited or torn)") from None
        if record.get("prev") != prev:
            raise AuditError(
                f"{path}: record {number} does not follow record {number - 1} "
                "(a record before it was edited, inserted or removed)"
            )
        if record.get("chain") != _chain(prev, record):
            raise AuditError(f"{path}: record {number} was edited after it was written")
        prev, count = record["chain"], number
    return count, prev
