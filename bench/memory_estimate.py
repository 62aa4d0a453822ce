"""Memory each phase of every packaged config needs, measured on the meta device (nothing
allocated): what `synthct config memory` prints, as a result file for docs/benchmarks.md.

    python bench/memory_estimate.py [--results bench/results/memory_estimate_<date>.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from phantom_world import bench_command

from synthct.artifacts import library_versions
from synthct.config import PACKAGED_CONFIGS, load_config
from synthct.models.memory import estimate_memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=None)
    args = p.parse_args()
    configs = {}
    for name in PACKAGED_CONFIGS:
        config = load_config(name)
        configs[name] = {
            "shape": list(config.data.shape),
            "spacing_mm": list(config.data.spacing_mm),
            "phases": [r.as_dict() for r in estimate_memory(config)],
        }
        print(name, json.dumps(configs[name]["phases"]), flush=True)
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "method": "one step per phase on the meta device; live tensor bytes tracked by a "
        "dispatch mode (synthct.models.memory); fp32; weights + AdamW moments + activation peak "
        "(gradients included); CUDA context, workspaces and fragmentation not counted",
        "versions": library_versions(),
        "configs": configs,
        "command": bench_command("memory_estimate.py", args),
    }
    if args.results:
        Path(args.results).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
