"""Train (federatedly, Flower simulation) and ship the pretrained phantom generator.

    python bench/pretrained_phantom.py --run runs/pretrained --resume [--budget-min 60] [--ship]

Trains on the demo sites with the demo config's ``federated`` schedule (resumable: rerun the
same command to continue), then scores it against the generator targets with the real-only
reference classifier (trained on the pooled ``train`` split of the phantoms) and, with
``--ship``, exports a sampling-only checkpoint (autoencoder + EMA UNet) plus the reference
models, the round log, the scores and the exact command into ``synthct/pretrained/phantom``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from synthct.artifacts import atomic_write_text, read_json, sha256_file, write_json
from synthct.checkpoint import generator_sha256, save_generator
from synthct.config import load_config, packaged_config_path
from synthct.data.dataset import load_cases
from synthct.data.phantoms import write_phantom_sites
from synthct.eval.generator_quality import generator_report
from synthct.fed.simulation import train_federated
from synthct.reference import load_reference
from synthct.trainer import ensure_reference

SHIP_DIR = Path(__file__).resolve().parents[1] / "synthct" / "pretrained" / "phantom"
# the shipped generator's training logs: kept in the repository, not shipped as package data
RECORD_DIR = Path(__file__).resolve().parent / "results" / "shipped_generator_training"
TARGETS = {"ae_ceiling_min": 0.9, "conditional_mean_min": 0.8, "conditional_class_min": 0.6}


def log_round(phase: str, done: int, total: int, **metrics: float) -> None:
    loss = metrics.get("loss")
    text = f" loss={loss:.4f}" if loss is not None else ""
    print(f"{time.strftime('%H:%M:%S')} {phase} round {done}/{total}{text}", flush=True)


def meets_targets(report: dict) -> dict[str, bool]:
    return {
        "ae_ceiling": min(report["ae_ceiling_per_class"].values()) >= TARGETS["ae_ceiling_min"],
        "conditional_mean": report["conditional_accuracy_mean"] >= TARGETS["conditional_mean_min"],
        "conditional_each_class": min(report["conditional_accuracy_per_class"].values())
        >= TARGETS["conditional_class_min"],
    }


def record_new_sha(before: str, what: str) -> str:
    """After the shipped generator's record changed (not its weights): its new sha256 and
    ``what`` changed, prepended to the sha line of ``TRAINING.md``; returns the new sha256."""
    after = generator_sha256(SHIP_DIR / "generator")
    note = f"`{after}` ({time.strftime('%Y-%m-%d')}: {what}; before: `{before[:8]}...`. "
    training = SHIP_DIR / "TRAINING.md"
    training.write_text(training.read_text().replace(f"`{before}` (", note, 1))
    print(f"shipped: {before[:12]} -> {after[:12]}")
    return after


def _wall_min(rounds_file: Path) -> float:
    rounds = [json.loads(x) for x in rounds_file.read_text().splitlines()]
    return sum(r.get("wall_s") or 0.0 for r in rounds) / 60


def _run_name(initial: Path) -> str:
    """The run a generator folder came from; the shipped folder names it in its command."""
    notes = initial.parent / "TRAINING.md"
    if initial.parent.resolve() == SHIP_DIR.resolve() and notes.is_file():
        match = re.search(r"--run runs/([\w.-]+)", notes.read_text())
        if match:
            return match.group(1)
    return initial.parent.name


def _records_of(initial: Path) -> Path:
    """Where the run that made the generator folder ``initial`` keeps its round logs."""
    return RECORD_DIR if initial.parent.resolve() == SHIP_DIR.resolve() else initial.parent


def ship(
    gen, run: Path, report: dict, command: str, log: Path | None, initial: Path | None
) -> None:
    """Export ``gen`` (the run's weights with this command's inference settings)."""
    history = ""
    staged = None
    if initial is not None and (_records_of(initial) / "rounds.jsonl").is_file():
        # a continuation ships its predecessor's round and console logs too (history/NAME/);
        # staged first because the predecessor may be the shipped folder replaced below
        staged = Path(tempfile.mkdtemp(prefix="synthct-ship-"))
        records = _records_of(initial)
        shutil.copy2(records / "rounds.jsonl", staged / "rounds.jsonl")
        for console in (initial.parent.with_suffix(".log"), records / "training.log"):
            if console.is_file():
                shutil.copy2(console, staged / "training.log")
        for notes in ("TRAINING.md", "quality.json"):  # the shipped predecessor's own record
            if (initial.parent / notes).is_file():
                shutil.copy2(initial.parent / notes, staged / notes)
        for earlier in sorted((records / "history").glob("*")):  # its own predecessors
            shutil.copytree(earlier, staged.parent / f"{staged.name}-{earlier.name}")
        earlier_min = sum(
            _wall_min(log) for log in staged.parent.glob(f"{staged.name}-*/rounds.jsonl")
        )
        history = (
            f"Continued from `{initial}` (run `{_run_name(initial)}`, {_wall_min(staged / 'rounds.jsonl'):.1f} min of "
            f"federated rounds, {earlier_min:.1f} min more in the runs it continued; their logs "
            f"in `history/` beside its round log). "
        )
    for folder in (SHIP_DIR, RECORD_DIR):
        if folder.exists():
            shutil.rmtree(folder)
    RECORD_DIR.mkdir(parents=True)
    if staged is not None:
        shutil.copytree(staged, RECORD_DIR / "history" / _run_name(initial))
        for earlier in sorted(staged.parent.glob(f"{staged.name}-*")):
            name = earlier.name[len(staged.name) + 1 :]
            shutil.copytree(earlier, RECORD_DIR / "history" / name)
            shutil.rmtree(earlier)
        shutil.rmtree(staged)
    save_generator(
        gen,
        SHIP_DIR / "generator",
        sampling_only=True,
        extra={"trained": read_json(run / "generator" / "config.json").get("trained")},
    )
    shutil.copytree(run / "reference", SHIP_DIR / "reference")
    write_json(
        SHIP_DIR / "reference" / "trained_on.json",
        {"manifest_sha256": sha256_file(run / "data" / "manifest.csv")},
        kind="reference-training-data",
    )
    shutil.copy2(run / "rounds.jsonl", RECORD_DIR / "rounds.jsonl")
    if log is not None and log.is_file():
        shutil.copy2(log, RECORD_DIR / "training.log")
    met = report.get("targets_met", {})
    verdict = (
        "All generator quality targets are met."
        if met and all(met.values())
        else f"Quality targets NOT met: {', '.join(k for k, v in met.items() if not v)}."
    )
    write_json(SHIP_DIR / "quality.json", report, kind="pretrained-quality")
    size = sum(p.stat().st_size for p in (SHIP_DIR / "generator").rglob("*.safetensors"))
    atomic_write_text(
        SHIP_DIR / "TRAINING.md",
        "# Pretrained phantom generator\n\n"
        f"Trained federatedly (Flower simulation, {len(gen.config.site_names)} demo sites, "
        f"FedAvg) on {time.strftime('%Y-%m-%d')}, CPU ({os.cpu_count()} cores). {history}"
        f"{_wall_min(run / 'rounds.jsonl'):.1f} min of federated rounds here (round log `rounds.jsonl`, "
        f"console log `training.log`, both in the repository's `{RECORD_DIR.relative_to(SHIP_DIR.parents[2])}/`, "
        f"not package data). {verdict}\n\n"
        f"Exact command (from the repository root, rerun to resume):\n\n    {command}\n\n"
        f"Generator sha256 (config.json): `{generator_sha256(SHIP_DIR / 'generator')}`; "
        f"weights {size / 2**20:.1f} MiB (autoencoder + EMA UNet, safetensors).\n\n"
        "Scores (reference classifier on holdout phantoms; targets: autoencoder ceiling >= 0.9 "
        "per class, conditional accuracy >= 0.8 mean and >= 0.6 per class):\n\n"
        f"```json\n{json.dumps(report, indent=2)}\n```\n\n"
        "The round log holds per-site losses, cases, bytes and sha256 of every round.\n",
    )
    print(f"shipped to {SHIP_DIR} ({size / 2**20:.1f} MiB of weights)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", default="runs/pretrained")
    parser.add_argument("--config", default=str(packaged_config_path("demo")))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--initial", help="continue from this generator folder (same networks) instead of zero"
    )
    parser.add_argument("--budget-min", type=float, default=None)
    parser.add_argument("--samples-per-class", type=int, default=16)
    parser.add_argument("--ship", action="store_true", help="export into synthct/pretrained")
    parser.add_argument("--log", type=Path, default=None, help="console log to ship with it")
    args = parser.parse_args()
    command = "python bench/pretrained_phantom.py " + " ".join(sys.argv[1:])
    config = load_config(args.config)
    run = Path(args.run)
    manifest = run / "data" / "manifest.csv"
    if not manifest.is_file():
        write_phantom_sites(config, run / "data")
    gen = train_federated(
        config,
        manifest,
        run,
        resume=args.resume and (run / "fed_state.json").is_file(),
        budget_min=args.budget_min,
        initial=args.initial,
        progress=log_round,
    )
    # sampling defaults come from this command's config: they do not touch the weights
    gen.config = gen.config.model_copy(update={"sampling": config.sampling})
    state = read_json(run / "fed_state.json")
    if state["phase"] != "done":
        print(f"stopped at {state['phase']} round {state['round']}; rerun with --resume")
        return
    train = load_cases(manifest, config, splits=("train",))
    holdout = load_cases(manifest, config, splits=("holdout",))
    ensure_reference(config, train, holdout, run)
    reference = load_reference(run / "reference", vocabulary_hash=config.labels.vocabulary_hash)
    report = generator_report(gen, reference, holdout, per_class=args.samples_per_class)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": "cpu",
        **report,
        "targets_met": meets_targets(report),
    }
    write_json(run / "pretrained_quality.json", report, kind="pretrained-quality")
    print(json.dumps(report, indent=2))
    if args.ship:
        ship(gen, run, report, command, args.log, Path(args.initial) if args.initial else None)


if __name__ == "__main__":
    main()
