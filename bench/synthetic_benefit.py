"""Does gated synthetic data help the downstream classifier? (the claim synthct exists for)

    python bench/synthetic_benefit.py [--seeds 3] [--budget-min N] [--out runs/bench_benefit]

On the demo phantoms (rare class 5 %, site_b has none), starting from the shipped phantom
generator: a per-site balanced cohort is generated and gated; then federated real-only,
federated real + gated synthetic, central real-only and local-only classifiers, each over
``--seeds`` seeds, evaluated per site on the real test split. If the cohort fails the gate, the
synthetic arm is still run with --force-ungated and labelled UNGATED, to see whether the gate
was right. Prints the table and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from synthct.checkpoint import load_generator
from synthct.cohort import generate_cohort, plan_cohort, reference_counts
from synthct.config import load_config, packaged_config_path
from synthct.data.phantoms import write_phantom_sites
from synthct.eval.gate import load_real, run_gate, write_gate
from synthct.pipeline.downstream import run_downstream
from synthct.pretrained import load_phantom_reference, phantom_dir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget-min", type=float, default=None, help="skip arms past this")
    parser.add_argument("--out", default="runs/bench_benefit")
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.out)
    base = load_config(packaged_config_path("demo"))
    down = base.downstream.model_copy(update={"seeds": list(range(args.seeds))})
    config = base.model_copy(update={"downstream": down})
    manifest = out / "data" / "manifest.csv"
    if not manifest.is_file():
        write_phantom_sites(config, out / "data")
    gen_dir = phantom_dir() / "generator"
    gen = load_generator(gen_dir)
    plan = plan_cohort(
        reference_counts(manifest, config), list(config.labels.classes), per_site=True
    )
    cohort = generate_cohort(gen, gen_dir, plan, out / "cohort")
    reference = load_phantom_reference(config.labels.vocabulary_hash)
    real = load_real(manifest, manifest, config=config, reference=reference)
    gate = run_gate(cohort, real, config=config, reference=reference)
    write_gate(gate, out / "cohort" / "gate.json")
    print(f"gate: {gate['verdict']} (failed: {gate['failed_rules']})", flush=True)
    ungated = gate["verdict"] != "pass"
    arms = {
        "federated": {"federated": True, "cohort_dir": out / "cohort", "force_ungated": ungated},
        "central": {"federated": False},
        "local": {"local": True},
    }
    table = {}
    for name, kw in arms.items():
        if args.budget_min and time.perf_counter() - start > args.budget_min * 60:
            print(f"budget reached: skipping {name}")
            continue
        t = time.perf_counter()
        res = run_downstream(config, manifest, out / name, **kw)
        for arm, data in res["arms"].items():
            label = f"{name} {arm}" + (" (UNGATED)" if arm != "real" and res["ungated"] else "")
            table[label] = data["summary"]
        print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu ({os.cpu_count()} cores)",
        "seeds": args.seeds,
        "cohort_cases": gate["cohort"]["cases"],
        "gate": {"verdict": gate["verdict"], "failed_rules": gate["failed_rules"]},
        "arms": table,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    print(f"{'arm':<40} {'bal.acc':>14} {'consolidation rec.':>20} {'worst site':>14}")
    for label, s in table.items():

        def f(m: dict) -> str:
            return f"{m['mean']:.3f}±{m['sd']:.3f}"

        print(
            f"{label:<40} {f(s['balanced_accuracy']):>14} {f(s['recall_consolidation']):>20} "
            f"{f(s['worst_site_balanced_accuracy']):>14}"
        )


if __name__ == "__main__":
    main()
