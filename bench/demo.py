"""Wall time and peak memory of `synthct demo`, over the whole process tree (Ray workers too).

    python bench/demo.py [--out runs/bench_demo] [--quick]

Runs the demo as a subprocess, samples the summed RSS of it and all its descendants every
0.5 s, and reads the per-stage times from RUN/demo.json. Targets: <= 10 min and <= 4 GiB on 2
CPU cores; ``--quick`` (the smoke config) should finish in <= 2 min.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from synthct.config import packaged_config_path


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/bench_demo")
    parser.add_argument("--quick", action="store_true", help="smoke config (CI-sized)")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "synthct.cli", "demo", "--out", str(out)]
    if args.quick:
        cmd += ["--config", str(packaged_config_path("smoke"))]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    watcher = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(watcher))
        time.sleep(0.5)
    wall = time.perf_counter() - start
    summary = json.loads((out / "demo.json").read_text()) if (out / "demo.json").is_file() else {}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": f"cpu ({os.cpu_count()} cores)",
        "config": "smoke" if args.quick else "demo",
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak / 2**30, 2),
        "stages_s": summary.get("stages_s"),
        "gate": summary.get("gate"),
    }
    print(json.dumps(result, indent=2))
    (out / "bench_demo.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
