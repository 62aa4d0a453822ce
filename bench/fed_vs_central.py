"""Bench: federated (FedAvg, FedProx) vs central vs site-alone generator training, equal steps.

    python bench/fed_vs_central.py --budget-min 40 [--fraction 0.1] [--alone site_b]
        [--arms central fedavg fedprox alone]

Every arm gets the same number of optimiser steps per phase: the demo config's
``train.ae_steps`` / ``train.diffusion_steps`` times ``--fraction``; federated arms split them
into rounds of ``local steps x sites``; the site-alone arm trains the central trainer on one
site's data only. ``--budget-min`` is the whole bench's wall-time budget, shared equally by the
arms (an arm that hits its share stops early; the steps it really did are reported). Scores come
from one reference classifier trained on the pooled ``train`` split. Writes
runs/bench_fed_vs_central/results.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from phantom_world import phantom_world

from synthct.artifacts import write_json
from synthct.config import SynthctConfig, load_config, packaged_config_path
from synthct.data.manifest import write_site_manifest
from synthct.eval.generator_quality import generator_report
from synthct.fed.simulation import train_federated
from synthct.reference import load_reference
from synthct.trainer import ensure_reference, train_central


def _schedule(config: SynthctConfig, fraction: float) -> SynthctConfig:
    ae = max(1, round(config.train.ae_steps * fraction))
    diff = max(1, round(config.train.diffusion_steps * fraction))
    n = len(config.site_names)
    fed = config.federated
    # keep local steps per round, choose rounds so sites x local x rounds == steps
    ae_rounds = max(1, round(ae / (n * fed.local_steps_ae)))
    diff_rounds = max(1, round(diff / (n * fed.local_steps_diffusion)))
    doc = config.model_dump()
    doc["train"].update({"ae_steps": ae_rounds * n * fed.local_steps_ae})
    doc["train"].update({"diffusion_steps": diff_rounds * n * fed.local_steps_diffusion})
    # no decoder-only phase: the central trainer has none, and every arm gets the same steps
    doc["federated"].update(
        {"ae_rounds": ae_rounds, "decoder_rounds": 0, "diffusion_rounds": diff_rounds}
    )
    return type(config).model_validate(doc)


def _bytes_per_round_per_site(run: Path) -> dict[str, float]:
    rounds = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
    out = {}
    for phase in ("autoencoder", "diffusion"):
        rs = [r for r in rounds if r["phase"] == phase and r["sites"]]
        if rs:
            out[phase] = {
                "up": sum(r["bytes_up"] / len(r["sites"]) for r in rs) / len(rs),
                "down": sum(r["bytes_down"] / r["sent"] for r in rs) / len(rs),
            }
    return out


def _steps_done(run: Path) -> int:
    """Optimiser steps this arm really ran (an arm stopped by its budget did fewer)."""
    if (run / "rounds.jsonl").is_file():
        rounds = [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]
        return sum(s["steps"] for r in rounds for s in r.get("sites", []))
    return len((run / "metrics.jsonl").read_text().splitlines())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(packaged_config_path("demo")))
    parser.add_argument("--out", default="runs/bench_fed_vs_central")
    parser.add_argument("--budget-min", type=float, default=40.0)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--alone", default="site_b", help="site for the site-alone arm")
    parser.add_argument("--samples-per-class", type=int, default=16)
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=["central", "fedavg", "fedprox", "alone"],
        default=["central", "fedavg", "fedprox", "alone"],
        help="which arms to run (the budget is split over these)",
    )
    args = parser.parse_args()
    base = load_config(args.config)
    config = _schedule(base, args.fraction)
    out = Path(args.out)
    manifest, train, holdout = phantom_world(config, out)
    ensure_reference(config, train, holdout, out / "shared")
    reference = load_reference(
        out / "shared" / "reference", vocabulary_hash=config.labels.vocabulary_hash
    )
    arms = [f"alone:{args.alone}" if a == "alone" else a for a in args.arms]
    share = args.budget_min / len(arms)
    results = {}
    for arm in arms:
        run = out / arm.replace(":", "_")
        if run.exists():
            shutil.rmtree(run)
        run.mkdir(parents=True)
        shutil.copytree(out / "shared" / "reference", run / "reference")
        print(f"{time.strftime('%H:%M:%S')} arm {arm}: {share:.1f} min", flush=True)
        t0 = time.perf_counter()
        extra = {}
        if arm == "central":
            gen = train_central(config, manifest, run, budget_min=share)
        elif arm.startswith("alone:"):
            site_manifest = write_site_manifest(manifest, args.alone, run / "site.csv")
            gen = train_central(config, site_manifest, run, budget_min=share)
        else:
            doc = config.model_dump()
            doc["federated"]["strategy"] = arm
            arm_config = type(config).model_validate(doc)
            gen = train_federated(arm_config, manifest, run, budget_min=share)
            extra["bytes_per_round_per_site"] = _bytes_per_round_per_site(run)
            extra["rounds_done"] = json.loads((run / "fed_state.json").read_text())
        wall = time.perf_counter() - t0
        steps = _steps_done(run)
        report = generator_report(gen, reference, holdout, per_class=args.samples_per_class)
        results[arm] = {
            "wall_s": round(wall, 1),
            "steps_done": steps,
            "s_per_step": round(wall / max(steps, 1), 4),
            **extra,
            **report,
        }
        print(json.dumps({arm: results[arm]}, indent=2), flush=True)
    if "central" in results:  # per step: a budget may stop arms early
        central = results["central"]["s_per_step"]
        for arm in ("fedavg", "fedprox"):
            if arm in results:
                overhead = results[arm]["s_per_step"] / central
                results[arm]["overhead_vs_central"] = round(overhead, 2)
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": "cpu",
        "cores": os.cpu_count(),
        "budget_min": args.budget_min,
        "steps": {"autoencoder": config.train.ae_steps, "diffusion": config.train.diffusion_steps},
        "arms": results,
    }
    write_json(out / "results.json", summary, kind="bench-fed-vs-central")
    print("| arm | wall s | steps | AE ceiling min | cond. acc mean | cond. acc min | overhead |")
    print("|---|---|---|---|---|---|---|")
    for arm, r in results.items():
        print(
            f"| {arm} | {r['wall_s']} | {r['steps_done']} | "
            f"{min(r['ae_ceiling_per_class'].values()):.2f} | "
            f"{r['conditional_accuracy_mean']:.2f} | "
            f"{min(r['conditional_accuracy_per_class'].values()):.2f} | "
            f"{r.get('overhead_vs_central', 1.0)} |"
        )


if __name__ == "__main__":
    main()
