"""Multi-machine runs with Flower's SuperLink/SuperNode: the app directory and TLS material.

``flwr run APP_DIR`` packs APP_DIR's files into a FAB that every node unpacks onto its
``sys.path``. synthct's app directory therefore holds only a ``pyproject.toml`` naming the
installed ``synthct.fed.app:server`` / ``synthct.fed.app:client`` (one app for the generator,
reference, gate, downstream and plugin tasks, chosen by the run config's ``task``): no Python file is
shipped, so nothing can shadow the synthct every site has installed. It is written on demand
into a folder the user chooses (``synthct fed app DIR``), because ``flwr run`` edits the
pyproject it is given.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
from pathlib import Path

from synthct import __version__
from synthct.artifacts import atomic_write_bytes, atomic_write_text

__all__ = ["write_flower_app", "write_tls_certificates", "write_supernode_keys"]

_APP_TEMPLATE = """\
# Flower app for synthct federated tasks (written by `synthct fed app`).
# It ships no code: every node runs the synthct installed in its own environment.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "synthct-fedapp"
version = "{version}"
description = "Federated 3D latent-diffusion CT generator training (synthct)"
license = "Apache-2.0"
dependencies = ["synthct=={version}"]

[tool.flwr.app]
publisher = "synthct"

[tool.flwr.app.components]
serverapp = "synthct.fed.app:server"
clientapp = "synthct.fed.app:client"

[tool.flwr.app.config]
# Paths are on the SuperLink's machine. `task`: generator, reference, gate, downstream, plugin
# (override with flwr run APP --run-config "task='gate' cohort='...' reference='...' out='...'").
# `config`: a YAML path or a packaged name (demo, smoke). downstream: `cohort` (a gated cohort
# folder; each site names its own copy's manifest in its node config `cohort`), `gate` (its
# gate.json, default COHORT/gate.json), `trusted-keys` (comma-separated public keys that must
# have signed it), `force-ungated` (use a cohort the gate refused; the results say so).
# plugin: `site` (the contributing site; its SuperNode needs contribute-plugins=true and its
# own copy of the base in node config `generator`), `generator` (the base on this machine),
# `registry` (the registry folder), `steps` and `decoder-rank` (0: the base's plugin settings),
# `accept` (gate: added only if the fused base's cohort for the site passes the gate judged with
# `reference` and `rules` on `gate-cases` per class; none: unjudged).
task = "generator"
config = "{config}"
out = "{out}"
resume = false
max-rounds = 0
seed = 0
cohort = ""
reference = ""
rules = ""
sign-key = ""
bootstrap = 200
gate = ""
trusted-keys = ""
force-ungated = false
site = ""
generator = ""
registry = ""
steps = 0
decoder-rank = 0
accept = "gate"
gate-cases = 8
"""


def write_flower_app(
    directory: str | Path, *, config: str = "demo", out: str = "runs/federated"
) -> Path:
    """Write the code-free Flower app directory; returns its ``pyproject.toml``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "pyproject.toml"
    atomic_write_text(path, _APP_TEMPLATE.format(version=__version__, config=config, out=out))
    return path


def write_tls_certificates(
    directory: str | Path, hosts: list[str] | None = None, *, days: int = 365
) -> dict[str, Path]:
    """A private CA and a SuperLink server certificate for ``hosts`` (names or IPs).

    Sites get ``ca.crt`` (``flower-supernode --root-certificates``); the SuperLink gets
    ``ca.crt``, ``server.pem``, ``server.key``. For production, use your PKI instead.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    hosts = hosts or ["127.0.0.1", "localhost"]
    directory = Path(directory)
    now = _dt.datetime.now(_dt.UTC)

    def _name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("synthct federation CA"))
        .issuer_name(_name("synthct federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    no_pass = serialization.NoEncryption()
    key_format = serialization.PrivateFormat.PKCS8
    files = {
        "ca.crt": ca_cert.public_bytes(pem),
        "ca.key": ca_key.private_bytes(pem, key_format, no_pass),
        "server.pem": server_cert.public_bytes(pem),
        "server.key": server_key.private_bytes(pem, key_format, no_pass),
    }
    out = {}
    for name, data in files.items():
        atomic_write_bytes(directory / name, data, private=name.endswith(".key"))
        out[name] = directory / name
    return out


def write_supernode_keys(directory: str | Path, site: str) -> tuple[Path, Path]:
    """An EC P-384 key pair (OpenSSH format) for SuperNode authentication of ``site``.

    The site keeps ``SITE.key`` (``flower-supernode --auth-supernode-private-key``); the
    federation operator registers ``SITE.pub`` with ``flwr supernode register SITE.pub CONN``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = Path(directory)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    private_path, public_path = directory / f"{site}.key", directory / f"{site}.pub"
    atomic_write_bytes(private_path, private, private=True)
    atomic_write_bytes(public_path, public + b"\n")
    return private_path, public_path
