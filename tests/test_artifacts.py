from __future__ import annotations

import json

import pytest

from synthct.artifacts import (
    FORMAT_VERSION,
    atomic_path,
    atomic_write_text,
    read_json,
    sha256_bytes,
    sha256_file,
    write_json,
)


def test_json_artifact_carries_format_and_versions(tmp_path):
    write_json(tmp_path / "a.json", {"x": 1}, kind="test")
    doc = read_json(tmp_path / "a.json")
    assert doc["format_version"] == FORMAT_VERSION
    assert doc["kind"] == "test"
    for lib in ("synthct", "torch", "monai", "diffusers", "peft", "flwr"):
        assert doc["versions"][lib] not in ("", "not-installed")
    assert doc["x"] == 1


def test_failed_atomic_write_keeps_old_file(tmp_path):
    target = tmp_path / "keep.json"
    target.write_text(json.dumps({"old": True}))
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


def test_sha256_file_matches_bytes(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert sha256_file(tmp_path / "f") == sha256_bytes(b"abc")


def test_atomic_writes_are_shared_like_ordinary_files(tmp_path):
    """Manifests and reports are read by other people and tools: the umask's mode, not the
    0600 of the temporary file they are written through."""
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    atomic_write_text(tmp_path / "manifest.csv", "path\n")
    assert (tmp_path / "manifest.csv").stat().st_mode & 0o777 == 0o666 & ~mask
    plain = tmp_path / "plain.csv"
    plain.write_text("path\n")
    assert plain.stat().st_mode & 0o777 == 0o666 & ~mask


def test_private_keys_are_never_readable_by_others(tmp_path):
    from synthct.fed.deployment import write_supernode_keys, write_tls_certificates

    private, public = write_supernode_keys(tmp_path / "keys", "site_a")
    assert private.stat().st_mode & 0o777 == 0o600
    files = write_tls_certificates(tmp_path / "certs", ["localhost"])
    for name, path in files.items():
        if name.endswith(".key"):
            assert path.stat().st_mode & 0o777 == 0o600, name
