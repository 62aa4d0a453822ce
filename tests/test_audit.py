"""Audit logs are hash chains: any edited, inserted or removed record is found and named."""

from __future__ import annotations

import json

import pytest

from synthct.audit import GENESIS, AuditError, append_chained, verify_chain
from synthct.cli import main


def _log(tmp_path, n=4):
    path = tmp_path / "site_a" / "audit.jsonl"
    for i in range(n):
        append_chained(path, {"site": "site_a", "round": i + 1, "sha256": f"{i:064d}"})
    return path


def test_an_intact_chain_verifies_from_genesis(tmp_path):
    path = _log(tmp_path)
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert records[0]["prev"] == GENESIS
    assert all(b["prev"] == a["chain"] for a, b in zip(records, records[1:], strict=False))
    assert verify_chain(path) == (4, records[-1]["chain"])


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (
            lambda lines: lines.__setitem__(1, lines[1].replace('"round": 2', '"round": 7')),
            "record 2 was edited",
        ),
        (lambda lines: lines.pop(1), "record 2 does not follow record 1"),
        (lambda lines: lines.insert(2, lines[0]), "record 3 does not follow record 2"),
        (lambda lines: lines.__setitem__(3, lines[3][:-5]), "record 4 is not JSON"),
    ],
    ids=["edited", "removed", "inserted", "torn"],
)
def test_the_first_broken_record_is_named(tmp_path, tamper, message, capsys):
    path = _log(tmp_path)
    lines = path.read_text().splitlines()
    tamper(lines)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditError, match=message):
        verify_chain(path)
    assert main(["audit", "verify", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_cli_verifies_every_log_under_a_folder(tmp_path, capsys):
    _log(tmp_path)
    other = tmp_path / "site_b" / "audit.jsonl"
    append_chained(other, {"site": "site_b"})
    assert main(["audit", "verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "site_a/audit.jsonl: OK, 4 records" in out and "site_b/audit.jsonl: OK, 1 records" in out
    assert main(["audit", "verify", str(tmp_path / "nothing")]) == 2


def test_a_log_from_before_chaining_and_a_torn_line_are_carried_on(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"site": "site_a", "round": 1}\n{"site": "site_a", "round": 2}\n')
    append_chained(path, {"site": "site_a", "round": 3})
    count, head = verify_chain(path)
    assert count == 3
    with open(path, "a") as fh:  # a crash mid-append
        fh.write('{"site": "site_a", "rou')
    append_chained(path, {"site": "site_a", "round": 4})
    assert verify_chain(path)[0] == 4
    # the legacy records are anchored: editing one breaks the first chained record
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace('"round": 1', '"round": 9')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(AuditError, match="record 3 does not follow"):
        verify_chain(path)


def test_a_rewritten_or_cut_log_fails_against_what_the_server_saw(tmp_path):
    from synthct.audit import verify_against_server

    path = _log(tmp_path)
    reported = [
        (i + 1, json.loads(x)["chain"]) for i, x in enumerate(path.read_text().splitlines())
    ]
    verify_against_server(path, reported)
    # a forger rewrites record 2 and recomputes every hash: the chain itself verifies again ...
    records = [json.loads(x) for x in path.read_text().splitlines()]
    path.unlink()
    for r in records:
        r = {k: v for k, v in r.items() if k not in ("prev", "chain")}
        append_chained(path, {**r, "sha256": "f" * 64} if r["round"] == 2 else r)
    verify_chain(path)
    # ... but not the heads the server logged
    with pytest.raises(AuditError, match="reported to the server in round 2"):
        verify_against_server(path, reported)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n")  # cut short
    with pytest.raises(AuditError, match="round 2"):
        verify_against_server(path, reported)
