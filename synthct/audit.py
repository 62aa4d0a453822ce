"""Tamper-evident audit logs: each record carries the hash of the chain before it.

A site records what leaves it (before it is sent) one JSON line per message. Each line holds
``prev`` (the previous line's ``chain``, 64 zeros for the first) and ``chain`` = sha256 of
``prev`` + the record's canonical JSON (sorted keys, without ``chain``). Editing, inserting or
removing a record breaks every ``chain`` from there on, so :func:`verify_chain` names the first
record that no longer fits. Each site also sends the ``chain`` of the record it just wrote with
its reply and the server logs it (``rounds.jsonl``): a log rewritten from scratch with
recomputed hashes, or cut short, no longer holds the values the server saw
(:func:`verify_against_server`).

A log begun before chaining (records without ``chain``) is kept: the first chained record's
``prev`` is the sha256 of every byte before it. A line torn by a crash mid-append is cut off
(with a warning) before the next record is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from synthct.errors import SynthctError

__all__ = ["AuditError", "GENESIS", "append_chained", "verify_chain", "verify_against_server"]

logger = logging.getLogger(__name__)

GENESIS = "0" * 64


class AuditError(SynthctError, ValueError):
    """An audit log is unreadable or its hash chain is broken; the message names the record."""


def _chain(prev: str, record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "chain"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256((prev + canonical).encode("utf-8")).hexdigest()


def _cut_torn_tail(path: Path) -> bytes:
    """The log's bytes, without a last line a crash left unfinished (never a whole record)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        logger.warning("%s: cutting a torn last line (%d bytes)", path, len(data) - keep)
        with open(path, "r+b") as fh:
            fh.truncate(keep)
        data = data[:keep]
    return data


def _last_chain(path: Path) -> str:
    if not path.is_file():
        return GENESIS
    data = _cut_torn_tail(path)
    if not data:
        return GENESIS
    try:
        last = json.loads(data.rstrip(b"\n").rsplit(b"\n", 1)[-1])
    except ValueError:
        last = None
    if isinstance(last, dict) and isinstance(last.get("chain"), str):
        return last["chain"]
    return hashlib.sha256(data).hexdigest()  # a log from before chaining: anchor on its bytes


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
    prev, count, chained, before = GENESIS, 0, False, hashlib.sha256()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
        except ValueError:
            raise AuditError(f"{path}: record {number} is not JSON (edited or torn)") from None
        if not chained and "chain" not in record:  # written before chaining: anchored below
            before.update((line + "\n").encode("utf-8"))
            count = number
            continue
        if not chained and number > 1:
            prev = before.hexdigest()
        chained = True
        if record.get("prev") != prev:
            raise AuditError(
                f"{path}: record {number} does not follow record {number - 1} "
                "(a record before it was edited, inserted or removed)"
            )
        if record.get("chain") != _chain(prev, record):
            raise AuditError(f"{path}: record {number} was edited after it was written")
        prev, count = record["chain"], number
    if not chained and count:
        prev = before.hexdigest()
    return count, prev


def verify_against_server(path: str | Path, reported: list[tuple[int, str]]) -> None:
    """Every ``(round, chain)`` the server logged for this site is in its audit log: a log
    rewritten with recomputed hashes, or cut short, fails here naming the round."""
    path = Path(path)
    seen = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            seen.add(json.loads(line).get("chain"))
        except ValueError:
            continue  # verify_chain names broken lines
    for server_round, chain in reported:
        if chain not in seen:
            raise AuditError(
                f"{path}: the record this site reported to the server in round {server_round} "
                f"(chain {chain[:16]}...) is not in its log (rewritten or cut short)"
            )
