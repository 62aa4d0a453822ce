"""Does the gate pass real data and fail each hard negative on the right rule?

    python bench/gate_verdicts.py --seeds 20 [--reference DIR] [--out runs/bench_gate] [--federated]

On the demo phantoms (seed 0 = the real sites): fresh real cohorts (new phantoms, the balanced
cohort's class mix) over ``--seeds`` seeds give the false-fail rate; then one of each hard
negative (near-copies, 20 % partial copying, mode collapse, +60 HU shift, relabelled classes,
single-site style at every site (two seeds each), site labels shuffled, one site's style claimed for every site) with the
rules it failed. Prints a table and writes ``results.json``.
``--federated`` judges every cohort with the federated gate instead (one Flower simulation,
4 sites each reading only its own rows; ``results_federated.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from synthct.config import load_config, packaged_config_path
from synthct.data.dataset import load_cases
from synthct.data.phantoms import write_phantom_sites
from synthct.eval import negatives
from synthct.eval.gate import load_real, run_gate
from synthct.pretrained import phantom_dir
from synthct.reference import load_reference

# the demo's balanced pooled cohort asks for about this many cases per class
COUNTS = {"nodule": 35, "ground_glass": 40, "consolidation": 60}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--reference", default=None, help="default: the shipped phantom reference")
    parser.add_argument("--out", default="runs/bench_gate")
    parser.add_argument("--skip-negatives", action="store_true")
    parser.add_argument("--federated", action="store_true", help="judge through Flower")
    args = parser.parse_args()
    config = load_config(packaged_config_path("demo"))
    out = Path(args.out)
    manifest = out / "real" / "manifest.csv"
    if not manifest.is_file():
        write_phantom_sites(config, out / "real")
    ref_dir = Path(args.reference) if args.reference else phantom_dir() / "reference"
    reference = load_reference(ref_dir, vocabulary_hash=config.labels.vocabulary_hash)
    cohorts: dict[str, Path] = {}
    for seed in range(1, args.seeds + 1):
        cohorts[f"fresh_real_seed{seed}"] = negatives.fresh_real_cohort(
            config, COUNTS, out / f"fresh{seed}", seed=1000 + seed
        )
    if not args.skip_negatives:
        base_manifest = out / "fresh1" / "manifest.csv"
        if not base_manifest.is_file():
            base_manifest = negatives.fresh_real_cohort(config, COUNTS, out / "fresh1", seed=1001)
        base = negatives.load_cohort_volumes(base_manifest)
        train = load_cases(manifest, config, splits=("train",))
        train_labels = [config.labels.classes[i] for i in train.labels.tolist()]
        cohorts["near_copies_all"] = negatives.near_copies(
            train.paths, train_labels, base, out / "copies", fraction=1.0
        )
        cohorts["partial_copies_20pct"] = negatives.near_copies(
            train.paths, train_labels, base, out / "partial", fraction=0.2
        )
        cohorts["mode_collapse"] = negatives.mode_collapse(base, out / "collapse")
        cohorts["hu_shift_60"] = negatives.hu_shift(base, out / "shift", offset_hu=60)
        cohorts["relabelled"] = negatives.relabelled(
            base, out / "relabel", classes=config.labels.classes
        )
        for site in config.site_names:  # one site's style, pooled: site_balance's negative
            for seed in (77, 78):
                cohorts[f"single_{site}_{seed}"] = negatives.fresh_real_cohort(
                    config, COUNTS, out / f"single_{site}_{seed}", seed=seed, sites=[site]
                )
        cohorts["sites_shuffled"] = negatives.sites_shuffled(base_manifest, out / "shuffled")
        cohorts["site_b_style_for_all"] = negatives.one_style_for_all_sites(
            config, COUNTS, out / "one_style", seed=78, style="site_b"
        )
    results: dict[str, dict] = {}

    def record(name: str, report: dict, seconds: float) -> None:
        values = {r["rule"]: f"{r['value']}/{r['threshold']}" for r in report["rules"]}
        results[name] = {
            "verdict": report["verdict"],
            "failed": report["failed_rules"],
            "values": values,
            "flags": len(report["flags"]),
            "seconds": round(seconds, 1),
        }
        print(
            f"{name:<22} {report['verdict']:<4} failed={report['failed_rules']} "
            f"flags={len(report['flags'])} ({results[name]['seconds']} s)",
            flush=True,
        )
        print("    " + " ".join(f"{k}={v}" for k, v in values.items()), flush=True)

    start = time.perf_counter()
    if args.federated:
        from synthct.fed.gate_app import run_gate_federated

        reports = run_gate_federated(
            list(cohorts.values()),
            manifest,
            config=config,
            reference=reference,
            run_dir=out / "federated",
        )
        each = (time.perf_counter() - start) / max(len(cohorts), 1)
        for name, report in zip(cohorts, reports, strict=True):
            record(name, report, each)
    else:
        real = load_real(manifest, manifest, config=config, reference=reference)
        print(f"real side featurised in {time.perf_counter() - start:.1f} s", flush=True)
        for name, path in cohorts.items():
            t = time.perf_counter()
            record(
                name,
                run_gate(path, real, config=config, reference=reference),
                time.perf_counter() - t,
            )
    fresh_fail = sum(
        results[f"fresh_real_seed{s}"]["verdict"] == "fail" for s in range(1, args.seeds + 1)
    )
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu ({os.cpu_count()} cores)",
        "mode": "federated" if args.federated else "central",
        "wall_s": round(time.perf_counter() - start, 1),
        "fresh_seeds": args.seeds,
        "fresh_false_fail_rate": fresh_fail / max(args.seeds, 1),
        "results": results,
    }
    name = "results_federated.json" if args.federated else "results.json"
    (out / name).write_text(json.dumps(summary, indent=2))
    print(f"false-fail rate of fresh real cohorts: {fresh_fail}/{args.seeds}")


if __name__ == "__main__":
    main()
