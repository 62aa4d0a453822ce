"""Bench: wall time to write the demo phantom sites (target: 200 volumes at 32^3 < 20 s, 2 cores).

python bench/phantoms.py [--config C] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from synthct.config import load_config, packaged_config_path
from synthct.data.phantoms import write_phantom_sites


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(packaged_config_path("demo")))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = load_config(args.config)
    out = args.out or tempfile.mkdtemp(prefix="synthct-bench-")
    start = time.perf_counter()
    manifest = write_phantom_sites(config, out)
    elapsed = time.perf_counter() - start
    n = sum(1 for _ in open(manifest)) - 1
    print(f"device=cpu cores={os.cpu_count()} volumes={n} shape={config.data.shape}")
    print(
        f"wall={elapsed:.1f}s per_volume={elapsed / n * 1000:.0f}ms per_200={elapsed / n * 200:.1f}s"
    )


if __name__ == "__main__":
    main()
