"""What differential privacy costs the generator: utility at three levels of epsilon against
no DP (issue 23).

    python bench/dp_utility.py [--noise 0.01 0.3 2] [--rounds 20] [--local-steps 60]
        [--clip 4] [--out runs/bench_dp_utility] [--results bench/results/dp_utility_<date>.json]

Every arm trains the same fresh class-conditional UNet (the demo's widths and sampling) in
Flower's simulation on the demo's four phantom sites, for ROUNDS x LOCAL_STEPS, on the shipped
generator's autoencoder (kept frozen, no rounds of its own): once with plain FedAvg, and once per
noise multiplier z with the diffusion updates under central DP (each site's update clipped to
CLIP, Gaussian noise of std z * CLIP / 4 on their mean: Flower's server-side fixed clipping; the
RDP accountant's epsilon at the config's delta over the run's releases). Only the UNet is under
DP here: the shipped autoencoder was trained on the same sites without it, so these epsilons
price the noise on the phase that generates, not a whole private generator (a private
autoencoder would cost more).

Scored per arm on the demo phantoms' ``holdout`` with the shipped reference classifier:
conditional accuracy (16 samples per class, seed 0) and the gate's rules on the demo's per-site
cohort (seed 0, default rules). Each arm trains resumably in ``OUT/<arm>`` (rerun the command to
go on; an arm folder trained under other settings is refused) and the result file is rewritten
after every arm.

The no-DP arm is plain FedAvg: case-weighted and unclipped, where the DP arms average clipped
updates with equal weights; the smallest noise multiplier's arm shows what clipping and equal
weights cost before the noise does.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from cohort_gate import gate_summary
from phantom_world import bench_command, phantom_world
from pretrained_phantom import log_round

from synthct.artifacts import read_json, write_json
from synthct.checkpoint import load_generator
from synthct.cohort import generate_cohort, plan_cohort, reference_counts
from synthct.config import load_config, packaged_config_path
from synthct.eval.gate import load_real, run_gate, write_gate
from synthct.eval.generator_quality import conditional_report
from synthct.fed.simulation import train_federated
from synthct.pretrained import load_phantom_reference, phantom_dir


def arm_overrides(args: argparse.Namespace, noise: float | None) -> list[str]:
    """The demo config, cut to a fresh UNet's diffusion rounds on the shipped autoencoder."""
    sets = [
        "federated.ae_rounds=0",
        "federated.decoder_rounds=0",
        f"federated.diffusion_rounds={args.rounds}",
        f"federated.local_steps_diffusion={args.local_steps}",
        "federated.restart_unet=true",
    ]
    if noise is not None:
        sets += [
            "federated.privacy.enabled=true",
            "federated.privacy.phases=[diffusion]",
            f"federated.privacy.noise_multiplier={noise}",
            f"federated.privacy.clipping_norm={args.clip}",
        ]
    return sets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--noise", type=float, nargs="+", default=[0.01, 0.3, 2.0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-steps", type=int, default=60)
    p.add_argument("--clip", type=float, default=4.0, help="DP clipping norm of a site update")
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("runs/bench_dp_utility"))
    p.add_argument(
        "--results",
        type=Path,
        default=Path(f"bench/results/dp_utility_{time.strftime('%Y-%m-%d')}.json"),
    )
    args = p.parse_args()
    demo = packaged_config_path("demo")
    base = load_config(demo)
    manifest, _, holdout = phantom_world(base, args.out)
    reference = load_phantom_reference(base.labels.vocabulary_hash)
    real = load_real(manifest, manifest, config=base, reference=reference)
    plan = plan_cohort(reference_counts(manifest, base), list(base.labels.classes), per_site=True)
    arms = []
    for noise in [None, *args.noise]:
        name = "no_dp" if noise is None else f"dp_z{noise:g}"
        run = args.out / name
        overrides = arm_overrides(args, noise)
        config = load_config(demo, overrides)
        recorded = run / "arm.json"
        if recorded.is_file() and read_json(recorded)["overrides"] != overrides:
            raise SystemExit(f"{run}: trained under other settings ({recorded}); use another --out")
        run.mkdir(parents=True, exist_ok=True)
        write_json(recorded, {"overrides": overrides}, kind="bench-dp-utility-arm")
        start = time.perf_counter()
        state = run / "fed_state.json"
        resumed = state.is_file()
        if not (resumed and read_json(state)["phase"] == "done"):
            train_federated(
                config,
                manifest,
                run,
                resume=state.is_file(),
                initial=phantom_dir() / "generator",
                progress=log_round,
            )
        trained = time.perf_counter()
        gen_dir = run / "generator"
        gen = load_generator(gen_dir)
        quality = conditional_report(gen, reference, holdout, per_class=args.per_class, seed=0)
        cohort = generate_cohort(gen, gen_dir, plan, run / "cohort", seed=0)
        report = run_gate(cohort, real, config=base, reference=reference, seed=0)
        write_gate(report, run / "cohort" / "gate.json")
        privacy = read_json(gen_dir / "config.json").get("privacy")
        rounds = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in rounds if r.get("phase") == "diffusion"]
        arms.append(
            {
                "arm": name,
                "noise_multiplier": noise,
                "epsilon": None if privacy is None else privacy["epsilon"],
                "delta": None if privacy is None else privacy["delta"],
                "releases": None if privacy is None else privacy["releases"],
                "diffusion_loss_first_last": [losses[0], losses[-1]] if losses else None,
                "conditional_accuracy_mean": quality["conditional_accuracy_mean"],
                "conditional_accuracy_per_class": quality["conditional_accuracy_per_class"],
                "pairwise_msssim_per_class": quality["pairwise_msssim_per_class"],
                **gate_summary(report),
                "train_s": None if resumed else round(trained - start, 1),  # None: resumed
                "score_s": round(time.perf_counter() - trained, 1),
            }
        )
        eps = arms[-1]["epsilon"]
        print(
            f"{time.strftime('%H:%M:%S')} {name}: epsilon {eps} conditional accuracy "
            f"{quality['conditional_accuracy_mean']:.3f}, gate {report['verdict']} "
            f"{report['failed_rules']}",
            flush=True,
        )
        write_json(
            args.results,
            {
                "date": time.strftime("%Y-%m-%d"),
                "device": f"cpu ({os.cpu_count()} cores)",
                "command": bench_command("dp_utility.py", args),
                "initial_generator": str(phantom_dir() / "generator"),
                "rounds": args.rounds,
                "local_steps": args.local_steps,
                "clipping_norm": args.clip,
                "sites": len(base.site_names),
                "cohort_cases": len(plan),
                "arms": arms,
            },
            kind="bench-dp-utility",
        )
    print(f"written {args.results}")


if __name__ == "__main__":
    main()
