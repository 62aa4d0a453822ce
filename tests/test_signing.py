"""Signed gate verdicts: an edited verdict, an unsigned one or a stranger's is refused."""

from __future__ import annotations

import json

import pytest

from synthct.artifacts import sha256_file
from synthct.cli import main
from synthct.eval.gate import verify_gate, write_gate
from synthct.signing import SignatureError, make_signing_key, sign_document, verify_document


@pytest.fixture
def keys(tmp_path):
    return make_signing_key(tmp_path / "keys", "gate"), make_signing_key(tmp_path / "keys", "other")


def test_a_signed_document_verifies_and_any_edit_breaks_it(keys):
    (private, public), (_, stranger) = keys
    assert private.stat().st_mode & 0o777 == 0o600
    signed = sign_document({"verdict": "fail", "rules": [{"value": 0.25}]}, private)
    assert verify_document(signed, [stranger, public], what="g") == str(public)
    roundtrip = json.loads(json.dumps(signed, indent=4))  # layout does not matter
    assert verify_document(roundtrip, [public], what="g") == str(public)
    for edit in ({"verdict": "pass"}, {"rules": [{"value": 0.24}]}, {"extra": 1}):
        with pytest.raises(SignatureError, match="edited since it was signed"):
            verify_document({**signed, **edit}, [public], what="g")
    with pytest.raises(SignatureError, match="not among the trusted"):
        verify_document(signed, [stranger], what="g")
    with pytest.raises(SignatureError, match="not signed"):
        verify_document({"verdict": "pass"}, [public], what="g")
    with pytest.raises(SignatureError, match="exists"):
        make_signing_key(private.parent, "gate")


def _passing_cohort(tmp_path):
    cohort = tmp_path / "cohort"
    (cohort / "cases").mkdir(parents=True)
    (cohort / "cases" / "a.nii.gz").write_bytes(b"volume")
    (cohort / "manifest.csv").write_text("path,label,site,split\ncases/a.nii.gz,normal,s,train\n")
    report = {
        "verdict": "pass",
        "failed_rules": [],
        "rules_changed": {"dcr": {"threshold": 0.6, "default_threshold": 0.7}},
        "cohort": {
            "manifest": "manifest.csv",
            "manifest_sha256": sha256_file(cohort / "manifest.csv"),
            "files": {"cases/a.nii.gz": sha256_file(cohort / "cases" / "a.nii.gz")},
        },
    }
    return cohort, report


def test_downstream_side_refuses_an_edited_or_unsigned_verdict(tmp_path, keys):
    (private, public), (stranger_key, _) = keys
    cohort, report = _passing_cohort(tmp_path)
    write_gate(report, cohort / "gate.json", sign_with=private)
    accepted = verify_gate(cohort / "gate.json", cohort, [public])
    assert accepted["signed_by"] == str(public) and accepted["rules_changed"]["dcr"]
    # someone turns a fail into a pass, or loosens a recorded rule: refused
    text = (cohort / "gate.json").read_text()
    (cohort / "gate.json").write_text(text.replace('"threshold": 0.6', '"threshold": 0.9'))
    with pytest.raises(SignatureError, match="edited since it was signed"):
        verify_gate(cohort / "gate.json", cohort, [public])
    write_gate(report, cohort / "gate.json")  # unsigned
    verify_gate(cohort / "gate.json", cohort)  # accepted only when no keys are required
    with pytest.raises(SignatureError, match="not signed"):
        verify_gate(cohort / "gate.json", cohort, [public])
    write_gate(report, cohort / "gate.json", sign_with=stranger_key)
    with pytest.raises(SignatureError, match="not among the trusted"):
        verify_gate(cohort / "gate.json", cohort, [public])


def test_keys_command_writes_a_pair_and_refuses_to_overwrite(tmp_path, capsys):
    assert main(["keys", str(tmp_path), "--name", "hospital_gate"]) == 0
    assert (tmp_path / "hospital_gate.key").is_file() and (tmp_path / "hospital_gate.pub").is_file()
    assert main(["keys", str(tmp_path), "--name", "hospital_gate"]) == 2
    assert "exists" in capsys.readouterr().err
