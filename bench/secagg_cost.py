"""What SecAgg+ costs on the demo config: round wall time and bytes vs plain FedAvg, how far
the secure aggregate is from FedAvg's, and the honest sites' update norms per phase (what the
clip norms of ``federated.secagg`` must sit above).

    python bench/secagg_cost.py [--rounds 2] [--clip 1000]
        [--results bench/results/secagg_cost_<date>.json]

Two federated runs of the demo generator in Flower's simulation on the demo phantoms, same
seed and schedule (``--rounds`` autoencoder, decoder and diffusion rounds each, the demo's
local steps): plain FedAvg, then SecAgg+ with clip norms of ``--clip`` (high, so nothing is
clipped and the aggregates are comparable). Per phase: mean round wall time of each arm and
their ratio (the issue's limit: 1.5x), bytes a site sends per round, the largest and median
update norm before clipping, and the final weights' largest absolute difference between the
arms (quantisation, compounded over the rounds). Only ``train`` is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from phantom_world import bench_command, phantom_manifest

from synthct.artifacts import write_json
from synthct.config import load_config, packaged_config_path
from synthct.fed.simulation import train_federated

PHASES = ("autoencoder", "decoder", "diffusion")


def _rounds(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "rounds.jsonl").read_text().splitlines()]


def _per_phase(run: Path) -> dict[str, dict]:
    out = {}
    for phase in PHASES:
        rows = [r for r in _rounds(run) if r["phase"] == phase]
        if not rows:
            continue
        out[phase] = {
            "rounds": len(rows),
            "wall_s_per_round": round(statistics.mean(r["wall_s"] for r in rows), 2),
            "bytes_up_per_site": round(
                statistics.mean(r["bytes_up"] / max(len(r["sites"]), 1) for r in rows)
            ),
            "bytes_down_per_site": round(
                statistics.mean(r["bytes_down"] / max(r["sent"], 1) for r in rows)
            ),
        }
        norms = [s["update_norm"] for r in rows for s in r["sites"] if "update_norm" in s]
        if norms:
            out[phase]["update_norm_max"] = round(max(norms), 4)
            out[phase]["update_norm_median"] = round(statistics.median(norms), 4)
    return out


def _max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(
        float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point()
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clip", type=float, default=1000.0)
    p.add_argument("--out", default="runs/bench_secagg_cost")
    p.add_argument("--results", default=None)
    args = p.parse_args()
    out = Path(args.out)
    base = load_config(packaged_config_path("demo"))
    manifest = phantom_manifest(base, out)
    doc = base.model_dump()
    doc["federated"].update(
        {"ae_rounds": args.rounds, "decoder_rounds": args.rounds, "diffusion_rounds": args.rounds}
    )
    plain_config = type(base).model_validate(doc)
    clip = {phase: args.clip for phase in PHASES}
    doc["federated"]["secagg"] = {"enabled": True, "clip_norm": clip}
    secure_config = type(base).model_validate(doc)
    arms, gens, walls = {}, {}, {}
    for name, config in (("plain", plain_config), ("secagg", secure_config)):
        run = out / name
        start = time.perf_counter()
        gens[name] = train_federated(config, manifest, run)
        walls[name] = round(time.perf_counter() - start, 1)
        arms[name] = _per_phase(run)
        print(name, json.dumps(arms[name]), flush=True)
    ratio = {
        phase: round(
            arms["secagg"][phase]["wall_s_per_round"] / arms["plain"][phase]["wall_s_per_round"], 3
        )
        for phase in arms["plain"]
    }
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu ({os.cpu_count()} cores), nothing else running",
        "config": "demo (4 sites), its local steps; rounds per phase as given",
        "secagg": {
            "clip_norm": args.clip,
            "max_weight": secure_config.federated.secagg.max_weight,
            "quantization_range": secure_config.federated.secagg.quantization_range,
        },
        "whole_run_wall_s": walls,
        "arms": arms,
        "secagg_over_plain_wall_per_round": ratio,
        "final_weights_max_abs_diff": {
            "autoencoder": _max_abs_diff(
                gens["plain"].autoencoder.state_dict(), gens["secagg"].autoencoder.state_dict()
            ),
            "unet": _max_abs_diff(
                gens["plain"].unet.state_dict(), gens["secagg"].unet.state_dict()
            ),
        },
        "command": bench_command("secagg_cost.py", args),
    }
    print(json.dumps(summary, indent=1))
    if args.results:
        write_json(Path(args.results), summary, kind="bench-secagg-cost")


if __name__ == "__main__":
    main()
