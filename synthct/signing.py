"""Signed JSON documents (Ed25519, ``cryptography``): who vouches for a gate verdict.

A gate report's file hashes show that a cohort is unchanged since it was judged, but anyone
can edit the verdict itself. Signing closes that: the gate signs the document with its private
key, and downstream accepts it only if one of the public keys it trusts verifies the
signature. What is signed is the document's canonical JSON (sorted keys, no spaces) as it
reads back from disk, without its ``signature`` field, so indentation does not matter and any
edited value does.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from synthct.artifacts import atomic_write_bytes, sha256_bytes
from synthct.errors import SynthctError

__all__ = [
    "SignatureError",
    "make_signing_key",
    "sign_document",
    "verify_document",
    "public_key_id",
]


class SignatureError(SynthctError, ValueError):
    """A document is unsigned where a signature is required, or its signature does not verify."""


def canonical_bytes(document: dict[str, Any]) -> bytes:
    """The bytes a signature covers: ``document`` minus ``signature``, canonical JSON, as it
    will read back from disk (values JSON cannot hold become their strings, as written)."""
    plain = json.loads(json.dumps(document, default=str))
    plain.pop("signature", None)
    return json.dumps(plain, sort_keys=True, separators=(",", ":")).encode("utf-8")


def make_signing_key(folder: str | Path, name: str) -> tuple[Path, Path]:
    """An Ed25519 key pair: ``NAME.key`` (PEM, 0600: keep it with whoever runs the gate) and
    ``NAME.pub`` (PEM: give it to everyone who must trust that gate's verdicts)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder = Path(folder)
    private, public = folder / f"{name}.key", folder / f"{name}.pub"
    if private.exists() or public.exists():
        raise SignatureError(f"{private}: a key of that name exists; choose another name")
    key = Ed25519PrivateKey.generate()
    atomic_write_bytes(
        private,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        private=True,
    )
    atomic_write_bytes(
        public,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    return private, public


def _public_raw(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_id(public_key_path: str | Path) -> str:
    """sha256 of the raw public key: how a signature names the key that made it."""
    return sha256_bytes(_public_raw(_load_public(Path(public_key_path))))


def _load_public(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SignatureError(f"{path}: not a readable public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key")
    return key


def sign_document(document: dict[str, Any], private_key_path: str | Path) -> dict[str, Any]:
    """``document`` with a ``signature`` block (algorithm, key id, base64 signature)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    path = Path(private_key_path)
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a readable private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key")
    signature = key.sign(canonical_bytes(document))
    return {
        **{k: v for k, v in document.items() if k != "signature"},
        "signature": {
            "algorithm": "Ed25519",
            "key_sha256": sha256_bytes(_public_raw(key.public_key())),
            "value": base64.b64encode(signature).decode("ascii"),
        },
    }


def verify_document(
    document: dict[str, Any], trusted_public_keys: list[str | Path], *, what: str
) -> str:
    """The trusted key (path) whose signature ``document`` carries; SignatureError naming
    ``what`` if it is unsigned, signed by an untrusted key, or edited since it was signed."""
    from cryptography.exceptions import InvalidSignature

    block = document.get("signature")
    if not isinstance(block, dict) or block.get("algorithm") != "Ed25519":
        raise SignatureError(
            f"{what}: not signed, but trusted keys were given; sign it with --sign"
        )
    trusted = {public_key_id(p): Path(p) for p in trusted_public_keys}
    path = trusted.get(str(block.get("key_sha256")))
    if path is None:
        raise SignatureError(f"{what}: signed by a key that is not among the trusted ones")
    try:
        signature = base64.b64decode(str(block.get("value")), validate=True)
        _load_public(path).verify(signature, canonical_bytes(document))
    except (InvalidSignature, ValueError):
        raise SignatureError(
            f"{what}: the signature does not match its content (edited since it was signed)"
        ) from None
    return str(path)
