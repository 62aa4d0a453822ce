"""``synthct keys``, ``audit verify`` and ``fed app|certs|keys``: signing keys, audit chains
and what a multi-machine Flower deployment needs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from synthct.cli.options import EXIT_OK, command, group
from synthct.errors import UsageError


def cmd_keys(args: argparse.Namespace) -> int:
    from synthct.signing import make_signing_key

    private, public = make_signing_key(args.dir, args.name)
    print(f"wrote {private} (keep it with the gate) and {public} (give it to downstream users)")
    return EXIT_OK


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Every audit log named (or found under a folder) checked along its hash chain."""
    from synthct.audit import AuditError, verify_against_server, verify_chain

    logs = []
    for given in map(Path, args.paths):
        logs += sorted(given.rglob("audit.jsonl")) if given.is_dir() else [given]
    if not logs:
        raise AuditError(f"no audit.jsonl under {', '.join(args.paths)}")
    reported = _reported_chains(Path(args.rounds)) if args.rounds else None
    for log in logs:
        records, head = verify_chain(log)
        note = ""
        if reported is not None:
            site = _log_site(log)
            verify_against_server(log, reported.get(site, []))
            note = f"; all {len(reported.get(site, []))} heads the server logged for {site} found"
        print(f"{log}: OK, {records} records, head {head[:16]}{note}")
    return EXIT_OK


def _reported_chains(rounds_log: Path) -> dict[str, list[tuple[int, str]]]:
    """Per site, the (round, audit chain) pairs a server's ``rounds.jsonl`` recorded."""
    if not rounds_log.is_file():
        raise UsageError(f"--rounds {rounds_log}: no such file")
    out: dict[str, list[tuple[int, str]]] = {}
    for line in rounds_log.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        for site in entry.get("sites", []):
            if site.get("audit_chain"):
                out.setdefault(site["site"], []).append((entry["round"], site["audit_chain"]))
    return out


def _log_site(log: Path) -> str:
    """The site an audit log belongs to (its records say)."""
    for line in log.read_text(encoding="utf-8").splitlines():
        return str(json.loads(line).get("site", log.parent.name))
    return log.parent.name


def cmd_privacy(args: argparse.Namespace) -> int:
    """Each artifact's privacy account and the run's, their sequential composition."""
    from synthct.privacy import artifact_privacy, describe_account, run_account

    records = {}
    for path in args.artifacts:
        artifact, record = artifact_privacy(path)
        records[f"{artifact} ({path})"] = record
    for line in describe_account(run_account(records)):
        print(line)
    return EXIT_OK


def cmd_fed_app(args: argparse.Namespace) -> int:
    from synthct.fed.deployment import write_flower_app

    path = write_flower_app(args.dir, config=args.config, out=args.out)
    print(f"wrote {path}; run it with: flwr run {args.dir} <superlink-connection> --stream")
    return EXIT_OK


def cmd_fed_certs(args: argparse.Namespace) -> int:
    from synthct.fed.deployment import write_tls_certificates

    files = write_tls_certificates(args.dir, args.host)
    print("wrote " + ", ".join(str(p) for p in files.values()))
    print("SuperLink: --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key")
    print("each site: flower-supernode --root-certificates ca.crt")
    return EXIT_OK


def cmd_fed_keys(args: argparse.Namespace) -> int:
    from synthct.fed.deployment import write_supernode_keys

    private, public = write_supernode_keys(args.dir, args.site)
    print(f"site keeps {private} (flower-supernode --auth-supernode-private-key)")
    print(f"operator registers {public}: flwr supernode register {public} <connection>")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this module's commands to ``synthct``: keys, privacy, audit verify,
    fed app|certs|keys."""
    p = command(
        sub,
        "keys",
        "make an Ed25519 key pair for signing gate verdicts",
        "synthct keys keys --name hospital_gate",
    )
    p.add_argument("dir", help="folder for NAME.key (private, 0600) and NAME.pub")
    p.add_argument("--name", default="gate", help="key file name")
    p.set_defaults(func=cmd_keys)

    p = command(
        sub,
        "privacy",
        "what a run's artifacts cost each site in differential privacy: each one's (epsilon, "
        "delta) and the run's (their sum)",
        "synthct privacy runs/gen/generator runs/ref runs/downstream",
    )
    p.add_argument(
        "artifacts", nargs="+", help="generator, reference or downstream folders of one run"
    )
    p.set_defaults(func=cmd_privacy)

    audit_sub = group(sub, "audit", "site audit logs")
    q = command(
        audit_sub,
        "verify",
        "check audit logs' hash chains; names the first edited record",
        "synthct audit verify runs/gen/sites --rounds runs/gen/rounds.jsonl",
    )
    q.add_argument("paths", nargs="+", help="audit.jsonl files or folders holding them")
    q.add_argument(
        "--rounds",
        metavar="ROUNDS_JSONL",
        help="the server's round log: every audit head a site reported must be in its log",
    )
    q.set_defaults(func=cmd_audit_verify)

    fed = group(sub, "fed", "multi-machine Flower deployment helpers")
    q = command(
        fed,
        "app",
        "write the code-free Flower app directory for `flwr run` (one app for the generator, "
        "reference, gate, downstream and plugin tasks: --run-config \"task='gate' "
        'cohort=... reference=...")',
        "synthct fed app flower_app --config demo --out runs/federated",
    )
    q.add_argument("dir", help="folder for the Flower app")
    q.add_argument("--config", default="demo", help="YAML path on the SuperLink machine or name")
    q.add_argument("--out", default="runs/federated", help="run folder on the SuperLink machine")
    q.set_defaults(func=cmd_fed_app)
    q = command(
        fed,
        "certs",
        "make a private CA and the SuperLink's TLS certificate",
        "synthct fed certs certs --host superlink.example.org",
    )
    q.add_argument("dir", help="folder for the CA and certificate files")
    q.add_argument("--host", action="append", help="SuperLink host name or IP (repeatable)")
    q.set_defaults(func=cmd_fed_certs)
    q = command(
        fed,
        "keys",
        "make a SuperNode authentication key pair for one site",
        "synthct fed keys keys --site site_a",
        required=("site",),
    )
    q.add_argument("dir", help="folder for the key pair")
    q.add_argument("--site", help="the site's name")
    q.set_defaults(func=cmd_fed_keys)
