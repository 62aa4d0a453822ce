"""What a synthct process pays to start: the import of the Flower app every ClientApp process
runs (Flower starts one per message), with and without the transformers guard.

    python bench/import_cost.py [--repeats 3] [--results bench/results/import_cost_<date>.json]

Each run is a fresh interpreter: ``python -X importtime -c "import synthct.fed.app"``; the
cumulative time of the top module is taken from its report. ``guarded``: as synthct runs
(``synthct.lean_imports`` keeps transformers out of MONAI's Transchex); ``unguarded``:
``SYNTHCT_MONAI_TRANSFORMERS=1``, as before the guard. Median over ``--repeats``. Run it with
nothing else on the CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from phantom_world import bench_command

from synthct.artifacts import library_versions, write_json

MODULE = "synthct.fed.app"


def import_seconds(env: dict[str, str]) -> tuple[float, bool]:
    """Cumulative import time of MODULE in a fresh interpreter, and whether transformers came."""
    code = f"import sys, {MODULE}; print('transformers' in sys.modules)"
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    for line in run.stderr.splitlines():  # "import time: self | cumulative | name"
        parts = [p.strip() for p in line.split("|")]
        if len(parts) == 3 and parts[2] == MODULE:
            return int(parts[1]) / 1e6, run.stdout.strip() == "True"
    raise RuntimeError(f"no importtime line for {MODULE}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--results", default=None)
    args = p.parse_args()
    arms = {
        "guarded": {k: v for k, v in os.environ.items() if k != "SYNTHCT_MONAI_TRANSFORMERS"},
        "unguarded": {**os.environ, "SYNTHCT_MONAI_TRANSFORMERS": "1"},
    }
    import_seconds(arms["guarded"])  # warm the file cache once
    rows = {}
    for name, env in arms.items():
        runs = [import_seconds(env) for _ in range(args.repeats)]
        rows[name] = {
            "median_s": round(statistics.median(s for s, _ in runs), 2),
            "runs_s": [round(s, 2) for s, _ in runs],
            "transformers_imported": runs[0][1],
        }
        print(name, rows[name], flush=True)
    if args.results:
        write_json(
            args.results,
            {
                "date": time.strftime("%Y-%m-%d"),
                "device": f"cpu ({os.cpu_count()} cores)",
                "versions": library_versions(),
                "module": MODULE,
                "rows": rows,
                "saved_s": round(rows["unguarded"]["median_s"] - rows["guarded"]["median_s"], 2),
                "command": bench_command("import_cost.py", args),
            },
            kind="bench-import-cost",
        )


if __name__ == "__main__":
    main()
