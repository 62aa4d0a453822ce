"""Do the generator's own cohorts pass the gate? The demo's cohort over several sampling seeds.

    python bench/cohort_gate.py [--generator DIR] [--seeds 0 1 2] [--out runs/bench_cohort_gate]
        [--results bench/results/cohort_gate_<date>.json]

For each seed, the demo's per-site cohort (every site's deficit against a balanced case mix,
each case sampled for the site it is made for) is generated from the generator (the shipped
phantom generator by default, with its own inference settings) and gated with the default
rules against the demo phantoms' ``train``/``holdout`` and the shipped reference models, as
``synthct demo`` does. Records every rule's value, limit and verdict per seed, per target site
the style distance (class-adjusted HU/texture features, the ``site_style`` rule's) of the cases
made for it to its own scans and to the nearest other site's, and the wall time of sampling and
gating. Nothing is loosened: the rules are ``DEFAULT_RULES``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from phantom_world import phantom_manifest

from synthct.artifacts import write_json
from synthct.checkpoint import generator_sha256, load_generator
from synthct.cohort import generate_cohort, plan_cohort, reference_counts
from synthct.config import load_config, packaged_config_path
from synthct.eval.gate import load_real, run_gate, write_gate
from synthct.pretrained import load_phantom_reference, phantom_dir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--generator", type=Path, default=phantom_dir() / "generator")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/bench_cohort_gate"))
    parser.add_argument(
        "--results",
        type=Path,
        default=Path(f"bench/results/cohort_gate_{time.strftime('%Y-%m-%d')}.json"),
    )
    args = parser.parse_args()
    config = load_config(packaged_config_path("demo"))
    manifest = phantom_manifest(config, args.out)
    gen = load_generator(args.generator)
    reference = load_phantom_reference(config.labels.vocabulary_hash)
    real = load_real(manifest, manifest, config=config, reference=reference)
    plan = plan_cohort(
        reference_counts(manifest, config), list(config.labels.classes), per_site=True
    )
    runs = []
    sha = generator_sha256(args.generator)
    for seed in args.seeds:
        start = time.perf_counter()
        folder = args.out / f"cohort_{sha[:8]}_{seed}"  # one per generator: reruns resume
        cohort = generate_cohort(gen, args.generator, plan, folder, seed=seed)
        sampled = time.perf_counter()
        report = run_gate(cohort, real, config=config, reference=reference, seed=seed)
        write_gate(report, folder / "gate.json")
        rules = {
            r["rule"]: {"value": r["value"], "limit": r["threshold"], "passed": r["passed"]}
            for r in report["rules"]
        }
        per_site = report["metrics"]["site_style_match"].get("detail", {}).get("per_site", {})
        style = {
            site: {
                "own": d["distance"][site],
                "nearest_other": min(v for s, v in d["distance"].items() if s != site),
                "nearest": d["nearest"],
            }
            for site, d in per_site.items()
        }
        runs.append(
            {
                "seed": seed,
                "site_style_distance": style,
                "verdict": report["verdict"],
                "failed_rules": report["failed_rules"],
                "rules": rules,
                "sample_s": round(sampled - start, 1),
                "gate_s": round(time.perf_counter() - sampled, 1),
            }
        )
        print(f"seed {seed}: {report['verdict']} {report['failed_rules']}", flush=True)
        for name, r in rules.items():
            print(f"  {name:<22} {r['value']!s:>10} limit {r['limit']!s:>8}  {r['passed']}")
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu ({os.cpu_count()} cores)",
        "generator": str(args.generator),
        "generator_sha256": sha,
        "sampling": gen.config.sampling.model_dump(),
        "cases": len(plan),
        "passed": sum(r["verdict"] == "pass" for r in runs),
        "seeds": runs,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.results, summary, kind="bench-cohort-gate")
    print(f"{summary['passed']}/{len(runs)} seeds pass; written {args.results}")


if __name__ == "__main__":
    main()
