"""The run's privacy account: each artifact's (epsilon, delta) read from its own record, added
up per site; an artifact without DP leaves the run unbounded; bad records are named."""

from __future__ import annotations

import json

import pytest

from synthct.artifacts import write_json
from synthct.cli import main
from synthct.errors import SynthctError
from synthct.privacy import artifact_privacy, describe_account, run_account


def _record(
    epsilon: float, delta: float = 1e-3, not_covered: tuple[str, ...] = (), every: bool = True
) -> dict:
    return {
        "epsilon": epsilon,
        "delta": delta,
        "releases": 4,
        "bounds_every_update": every,
        "not_covered": list(not_covered),
    }


def _artifacts(tmp_path, generator: dict | None, reference: dict | None, downstream: dict | None):
    gen, ref, down = tmp_path / "generator", tmp_path / "reference", tmp_path / "downstream"
    for folder in (gen, ref, down):
        folder.mkdir()
    write_json(gen / "config.json", {"privacy": generator} if generator else {}, kind="generator")
    info = {"privacy": reference} if reference else {}
    write_json(ref / "reference.json", {"info": info}, kind="reference-model")
    body = {"privacy": downstream} if downstream else {}
    write_json(down / "results.json", body, kind="synthct-downstream")
    return gen, ref, down


def test_the_run_adds_every_artifacts_epsilon_and_delta(tmp_path, capsys):
    paths = _artifacts(
        tmp_path, _record(2.0, not_covered=("latent moments",)), _record(1.5), _record(0.5, 1e-4)
    )
    records = dict(artifact_privacy(p) for p in paths)
    assert set(records) == {"generator", "reference", "downstream"}
    account = run_account(records)
    assert account["epsilon"] == pytest.approx(4.0)
    assert account["delta"] == pytest.approx(2.1e-3)
    assert account["without_dp"] == [] and account["not_covered"] == ["generator: latent moments"]
    assert main(["privacy", *map(str, paths)]) == 0
    out = capsys.readouterr().out
    assert "the run: epsilon 4 at delta 0.0021 per site" in out
    assert "not covered by any epsilon: generator (" in out and "): latent moments" in out


def test_an_artifact_without_dp_leaves_the_run_without_a_bound(tmp_path):
    records = dict(artifact_privacy(p) for p in _artifacts(tmp_path, _record(2.0), None, None))
    account = run_account(records)
    assert account["epsilon"] is None and account["without_dp"] == ["reference", "downstream"]
    lines = describe_account(account)
    assert "reference: no noised release (no epsilon)" in lines
    assert lines[-1].startswith(
        "the run: no privacy bound per site (reference released without noise; downstream"
    )
    # DP switched on but nothing released yet is no bound either
    assert run_account({"generator": {**_record(1.0), "epsilon": None}})["epsilon"] is None


def test_a_generator_whose_autoencoder_was_not_noised_bounds_nothing_for_the_run():
    partial = _record(2.0, not_covered=("autoencoder updates",), every=False)
    account = run_account({"generator": partial, "reference": _record(1.0)})
    assert account["epsilon"] is None and account["partial"] == ["generator"]
    lines = describe_account(account)
    assert lines[0].startswith("generator: epsilon 2 at delta 0.001 per site over its noised")
    assert "generator released some updates without noise" in lines[2]


def test_a_file_that_is_no_artifact_or_no_json_is_named(tmp_path):
    other = tmp_path / "config.json"
    other.write_text(json.dumps({"kind": "something-else"}))
    with pytest.raises(SynthctError, match="config.json: not a trained artifact"):
        artifact_privacy(other)
    broken = tmp_path / "results.json"
    broken.write_text("{ not json")
    with pytest.raises(SynthctError, match="results.json: not a readable JSON record"):
        artifact_privacy(broken)
    assert main(["privacy", str(tmp_path / "missing")]) != 0
