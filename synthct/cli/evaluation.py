"""``synthct reference``, ``gate`` and ``downstream``: the reference model, the cohort's verdict,
and the classifiers that show whether a gated cohort helps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from synthct.cli.options import (
    EXIT_BAD_INPUT,
    EXIT_GATE_FAILED,
    EXIT_OK,
    chosen_device,
    command,
    config_options,
    data_option,
    device_option,
    gate_reference,
    renamed,
    run_config,
    seed_option,
)
from synthct.errors import UsageError


def cmd_reference(args: argparse.Namespace) -> int:
    """Train the frozen real-only reference classifier/encoder the gate and quality checks use:
    on the pooled ``train`` split, or federatedly (FedAvg; each site reads only its rows)."""
    from synthct.pipeline.reference import build_reference
    from synthct.progress import progress_bar

    config = run_config(args.config, args.set)
    manifest = Path(args.data)  # that it is a manifest file: checked by main before any command
    out = Path(args.out)
    device = chosen_device(args, federated=args.federated)
    if args.federated:  # the rounds log their own progress
        model = build_reference(config, manifest, out, federated=True, seed=args.seed)
    else:
        with progress_bar("reference") as update:
            model = build_reference(
                config,
                manifest,
                out,
                federated=False,
                seed=args.seed,
                device=device,
                progress=lambda done, total, **m: update(done, total, **m),
            )
    holdout = model.info.get("holdout", {})
    print(
        f"reference ({model.info.get('trained', 'central')}): {out}; holdout accuracy "
        f"{holdout.get('accuracy', float('nan')):.3f}, balanced {holdout.get('balanced_accuracy', float('nan')):.3f}"
    )
    return EXIT_OK


def cmd_gate(args: argparse.Namespace) -> int:
    from synthct.data.manifest import read_manifest

    if args.device == "cuda":  # a device the run cannot have is refused first
        chosen_device(args, federated=args.federated)
    cohort = Path(args.cohort)  # a mistake here is answered before the heavy imports
    if not cohort.exists():
        raise UsageError(f"--cohort {cohort}: no such cohort folder or manifest")
    manifest = cohort / "manifest.csv" if cohort.is_dir() else cohort
    read_manifest(manifest)  # a missing or unfinished cohort is refused before any work
    out = gate_path(args)

    from synthct.artifacts import read_json
    from synthct.eval.gate import GateError, drop_flagged, load_rules
    from synthct.pipeline.gate import judge_cohort

    config = run_config(args.config, args.set)
    rules = load_rules(args.rules)
    reference = gate_reference(args.reference_model, config)
    reference.to(chosen_device(args, federated=args.federated))  # federated: sites featurise
    if args.federated and not args.data:
        raise GateError("--federated needs --data (each site reads only its own rows)")
    report = judge_cohort(
        manifest,
        out,
        config=config,
        reference=reference,
        train_manifest=args.train_manifest or args.data,
        holdout_manifest=args.holdout_manifest or args.data,
        sites_manifest=args.data if args.federated else None,
        rules=rules,
        seed=args.seed,
        sign_with=args.sign,
    )
    _print_gate(report)
    print(f"gate report: {out}")
    if args.drop_flagged:
        kept = drop_flagged(manifest.parent, read_json(out), args.drop_flagged)
        print(f"unflagged cases written to {kept} ({len(report['flags'])} dropped); gate it again")
    return EXIT_OK if report["verdict"] == "pass" else EXIT_GATE_FAILED


def gate_path(args: argparse.Namespace) -> Path:
    """Where ``gate`` writes its report: ``OUT/gate.json``, by default in the cohort's folder
    (where ``downstream`` looks); an ``--out`` ending in ``.json`` is the old file form."""
    if args.out and args.out.endswith(".json"):
        return Path(args.out)
    if args.out:
        return Path(args.out) / "gate.json"
    cohort = Path(args.cohort)
    return (cohort if cohort.is_dir() else cohort.parent) / "gate.json"


def _print_gate(report: dict) -> None:
    from synthct.eval.gate import gate_table, not_evaluated_note
    from synthct.progress import console

    console.print(gate_table(report))
    note = not_evaluated_note(report)
    if note:
        print(note)
    for flag in report["flags"][:10]:
        console.print(f"flagged {flag['path']}: {'; '.join(flag['reasons'])}")
    if len(report["flags"]) > 10:
        console.print(f"... and {len(report['flags']) - 10} more flagged (see the gate report)")


def cmd_downstream(args: argparse.Namespace) -> int:
    from synthct.pipeline.downstream import downstream_table, run_downstream
    from synthct.progress import console, progress_bar

    config = run_config(args.config, args.set)
    device = chosen_device(args, federated=args.federated)
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            print(f"synthct: error: --seeds {args.seeds!r}: expected e.g. 0,1,2", file=sys.stderr)
            return EXIT_BAD_INPUT
        config = config.model_copy(
            update={"downstream": config.downstream.model_copy(update={"seeds": seeds})}
        )
    with progress_bar("downstream") as update:
        results = run_downstream(
            config,
            args.data,
            args.out,
            cohort_dir=args.cohort,
            gate_json=args.gate,
            federated=args.federated,
            force_ungated=args.force_ungated,
            trusted_keys=args.trusted_key,
            progress=update,
            device=device,
        )
    changed = (results.get("gate") or {}).get("rules_changed")
    if changed:
        console.print(f"[yellow]the cohort's gate used non-default rules: {changed}")
    if results["ungated"]:
        console.print("[bold red]UNGATED: the cohort did not pass (or was changed after) the gate")
    console.print(downstream_table(results))
    print(f"results: {Path(args.out) / 'results.json'}")
    return EXIT_OK


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add this module's commands to ``synthct``: gate, reference, downstream."""
    p = command(
        sub,
        "gate",
        "score a cohort (fidelity, diversity, privacy, bias) against real data and judge it",
        "synthct gate --cohort cohort --data sites/manifest.csv",
        exits="\n  3  the cohort failed the gate",
        required=("cohort",),
    )
    p.add_argument("--cohort", help="cohort folder (with manifest.csv) or its manifest")
    data_option(
        p,
        "its train and holdout splits (central), or the sites' rows each site reads (--federated)",
    )
    renamed(p, "--manifest", "--data", "data")
    renamed(p, "--train", "--data", "train_manifest")
    renamed(p, "--holdout", "--data", "holdout_manifest")
    p.add_argument(
        "--federated",
        action="store_true",
        help="judge through Flower: each site scores the cohort on its own cases, sends aggregates",
    )
    p.add_argument("--rules", help="YAML overriding rule thresholds (see README)")
    p.add_argument(
        "--out",
        help="folder for gate.json (default: the cohort's folder, where downstream looks for it)",
    )
    config_options(p, "the vocabulary, label maps and geometry")
    p.add_argument(
        "--reference-model",
        metavar="DIR",
        help="reference model folder (default: the shipped phantom one)",
    )
    renamed(p, "--reference", "--reference-model", "reference_model")
    p.add_argument("--drop-flagged", metavar="DIR", help="also write the unflagged cases here")
    p.add_argument(
        "--sign",
        metavar="KEY",
        help="sign the verdict with this Ed25519 private key (made by `synthct keys`)",
    )
    seed_option(p, 0, "bootstrap intervals")
    device_option(p, "auto", "the reference encoder (central gate; federated sites use CPU)")
    p.set_defaults(func=cmd_gate)

    p = command(
        sub,
        "reference",
        "train the frozen reference classifier/encoder the gate uses (central or federated)",
        "synthct reference --data sites/manifest.csv --out reference --federated",
        required=("data", "out"),
    )
    data_option(p, "its train split trains, its holdout split reports")
    renamed(p, "--manifest", "--data", "data")
    p.add_argument("--out", help="reference model folder")
    p.add_argument(
        "--federated", action="store_true", help="FedAvg over the sites (Flower simulation)"
    )
    config_options(p)
    seed_option(p)
    device_option(p, "auto", "central training (federated sites train on CPU)")
    p.set_defaults(func=cmd_reference)

    p = command(
        sub,
        "downstream",
        "train classifiers on real data, and on real + gated synthetic data, and compare",
        "synthct downstream --data sites/manifest.csv --cohort cohort --federated --out results",
        required=("data", "out"),
    )
    data_option(p, "train (and holdout for early stopping) to learn, test to report")
    renamed(p, "--real", "--data", "data")
    p.add_argument("--cohort", help="synthetic cohort folder (needs a passing gate.json)")
    p.add_argument("--gate", help="gate report (default: COHORT/gate.json)")
    p.add_argument("--federated", action="store_true", help="FedAvg over the sites (Flower)")
    p.add_argument(
        "--force-ungated", action="store_true", help="use a cohort without a passing gate"
    )
    p.add_argument(
        "--trusted-key",
        action="append",
        default=None,
        metavar="PUB",
        help="accept only a gate verdict signed by this public key (repeatable)",
    )
    p.add_argument("--out", help="results folder")
    config_options(p)
    p.add_argument("--seeds", help="comma-separated seeds (default: config downstream.seeds)")
    device_option(p, "auto", "the central arms (federated sites train on CPU)")
    p.set_defaults(func=cmd_downstream)
