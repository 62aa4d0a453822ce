"""What travels: safetensors bytes checked by sha256, and the audit record of what a site sent."""

from __future__ import annotations

import json

import pytest
import torch

from synthct.fed.errors import SiteError
from synthct.fed.payload import payload_digest, tensors_from_bytes, tensors_to_bytes, write_audit


def test_payload_bytes_round_trip_and_tamper():
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    data = tensors_to_bytes(tensors)
    from synthct.artifacts import sha256_bytes

    back = tensors_from_bytes(data, sha256=sha256_bytes(data), what="x")
    assert torch.equal(back["w"], tensors["w"])
    tampered = data[:-1] + bytes([data[-1] ^ 1])
    with pytest.raises(SiteError, match="sha256"):
        tensors_from_bytes(tampered, sha256=sha256_bytes(data), what="frozen autoencoder")


def test_audit_record_matches_payload(tmp_path):
    tensors = {"w": torch.randn(3, 3), "b": torch.zeros(3)}
    rec = write_audit(
        tmp_path,
        site="site_a",
        phase="autoencoder",
        server_round=3,
        tensors=tensors,
        metrics={"num-examples": 9},
        keep_payload=True,
    )
    size, digest = payload_digest(tensors)
    assert rec["bytes"] == size == 4 * 12 and rec["sha256"] == digest
    line = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert line["round"] == 3 and line["tensors"] == 2
    from safetensors.torch import load_file

    kept = load_file(tmp_path / line["payload_file"])
    assert payload_digest(kept)[1] == digest
