"""The gate stage: a cohort's verdict against the sites' real data, written as gate.json.

The command line (``synthct gate``) and the demo both judge a cohort this way: centrally
(``train`` and ``holdout`` manifests read here) or federatedly (each site reads its own rows of
``sites_manifest`` and only aggregates leave it), then the verdict is written, signed when a
key is given. A fail is a valid result, returned like a pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from synthct.config import SynthctConfig
from synthct.eval.gate import GateError, RuleSpec, load_real, run_gate, write_gate
from synthct.reference import ReferenceModel

__all__ = ["judge_cohort"]


def judge_cohort(
    cohort_manifest: str | Path,
    out: str | Path,
    *,
    config: SynthctConfig,
    reference: ReferenceModel,
    train_manifest: str | Path | None = None,
    holdout_manifest: str | Path | None = None,
    sites_manifest: str | Path | None = None,
    rules: dict[str, RuleSpec] | None = None,
    seed: int = 0,
    bootstrap: int = 200,
    sign_with: str | Path | None = None,
) -> dict[str, Any]:
    """Judge ``cohort_manifest`` and write the report to ``out`` (gate.json); returns it.

    ``sites_manifest``: judge federatedly, every site scoring its own rows of it (the Flower
    run's files go beside ``out``); otherwise ``train_manifest`` and ``holdout_manifest`` are
    read centrally. ``bootstrap``: resamples for the rules' intervals; ``rules``: the rules
    to judge by (default: the gate's; others are recorded in the report); ``sign_with``: the
    Ed25519 key that signs the verdict."""
    out = Path(out)
    if sites_manifest is not None:
        from synthct.fed.gate_app import run_gate_federated

        report = run_gate_federated(
            cohort_manifest,
            sites_manifest,
            config=config,
            reference=reference,
            run_dir=out.resolve().parent / "gate_federated",
            rules=rules,
            seed=seed,
            bootstrap=bootstrap,
        )
    else:
        if not (train_manifest and holdout_manifest):
            raise GateError("the gate needs --data (a manifest with train and holdout splits)")
        real = load_real(train_manifest, holdout_manifest, config=config, reference=reference)
        report = run_gate(
            cohort_manifest,
            real,
            config=config,
            reference=reference,
            rules=rules,
            seed=seed,
            bootstrap=bootstrap,
        )
    return write_gate(report, out, sign_with=sign_with)  # as written: signed when a key is given
