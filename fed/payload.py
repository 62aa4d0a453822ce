"""What travels between a site and the server, and the site's record of it: the run config as
JSON, tensors as safetensors bytes checked by sha256 (never pickle), a digest of an update, and
the site's hash-chained audit record of exactly what it sent.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from synthct.artifacts import atomic_write_bytes, sha256_bytes
from synthct.audit import append_chained
from synthct.config import SynthctConfig, config_from_dict
from synthct.fed.errors import SiteError

__all__ = [
    "config_to_json",
    "config_from_json",
    "tensors_to_bytes",
    "tensors_from_bytes",
    "payload_digest",
    "write_audit",
]


def config_to_json(config: SynthctConfig) -> str:
    return json.dumps(config.model_dump(mode="json"), sort_keys=True)


def config_from_json(text: str) -> SynthctConfig:
    return config_from_dict(json.loads(text), source="<federated run config>")


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes (never pickle) for tensors that travel inside a config record."""
    return save_safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def tensors_from_bytes(data: bytes, *, sha256: str, what: str) -> dict[str, torch.Tensor]:
    if sha256_bytes(data) != sha256:
        raise SiteError(f"{what}: sha256 mismatch, refusing the payload")
    return load_safetensors_bytes(data)


def payload_digest(tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
    """(bytes, sha256) over tensor names, dtypes, shapes and raw data, in name order."""
    h = hashlib.sha256()
    size = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(raw)
        size += len(raw)
    return size, h.hexdigest()


def write_audit(
    audit_dir: Path,
    *,
    site: str,
    phase: str,
    server_round: int,
    tensors: dict[str, torch.Tensor],
    metrics: dict[str, Any],
    keep_payload: bool = False,
) -> dict[str, Any]:
    """Record exactly what leaves the site (before it is sent), hash-chained to the site's
    earlier records (``synthct audit verify``). Returns the record."""
    size, digest = payload_digest(tensors)
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "site": site,
        "phase": phase,
        "round": server_round,
        "tensors": len(tensors),
        "tensor_names_sha256": sha256_bytes("\n".join(sorted(tensors)).encode()),
        "bytes": size,
        "sha256": digest,
        "metrics": metrics,
    }
    if keep_payload:
        name = f"{phase}-round{server_round:04d}.safetensors"
        atomic_write_bytes(audit_dir / "payloads" / name, tensors_to_bytes(tensors))
        record["payload_file"] = f"payloads/{name}"
    return append_chained(audit_dir / "audit.jsonl", record)
