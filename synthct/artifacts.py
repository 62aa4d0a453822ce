"""Atomic file writes, hashes and the version header every synthct artifact carries.

Every step of the data path writes into a run directory and may be interrupted at any moment,
so writes go to a temporary file in the same folder and are renamed into place: a reader sees
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT_VERSION",
    "TRACKED_LIBRARIES",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json",
    "read_json",
    "append_jsonl",
    "sha256_file",
    "sha256_bytes",
    "library_versions",
    "artifact_header",
]

FORMAT_VERSION = 1
TRACKED_LIBRARIES = ("synthct", "torch", "monai", "diffusers", "peft", "flwr")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: os.umask can only be read by setting it


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, private: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.
    The file gets the umask's mode, or stays 0600 throughout with ``private`` (keys)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    if not private:  # mkstemp makes 0600; outputs are shared as usual
        os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, private: bool = False) -> None:
    """Write ``data`` to ``path`` atomically; ``private`` (keys): mode 0600 before any byte."""
    with atomic_path(path, private=private) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries whose behaviour shapes synthct's artifacts."""
    out: dict[str, str] = {}
    for name in TRACKED_LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not-installed"
    return out


def artifact_header(kind: str) -> dict[str, Any]:
    """The fields every JSON artifact starts with: what it is, its format and the versions."""
    return {"kind": kind, "format_version": FORMAT_VERSION, "versions": library_versions()}


def write_json(path: str | os.PathLike[str], payload: dict[str, Any], *, kind: str) -> None:
    """Write ``payload`` atomically as JSON, prefixed with :func:`artifact_header`."""
    document = {**artifact_header(kind), **payload}
    atomic_write_text(path, json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON line (used for logs that grow: metrics, rounds, audit)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, or of a folder (a DICOM series): of its files' relative names and
    sha256s in name order, so renaming, changing, adding or removing a slice all change it."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{f.relative_to(path).as_posix()}\0{sha256_file(f)}\n".encode())
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
