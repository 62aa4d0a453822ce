"""Train and ship the real-only reference classifier/encoder of the demo phantoms.

    python bench/ship_reference.py [--config C] [--out runs/ship_reference]

The gate and every quality check judge with a reference model trained on real ``train`` cases
only. The demo and the tests use the shipped one when the phantoms are exactly those it was
trained on (``trained_on.json`` holds their manifest's sha256); when the benchmark's phantoms
change, this retrains it (central, ``train.reference_epochs``) on the demo sites at the
config's seed and replaces ``synthct/pretrained/phantom/reference``. The generator next to it
is left as it is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from phantom_world import phantom_world

from synthct.artifacts import sha256_file, write_json
from synthct.config import load_config, packaged_config_path
from synthct.trainer import ensure_reference

SHIP = Path(__file__).resolve().parents[1] / "synthct" / "pretrained" / "phantom" / "reference"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=str(packaged_config_path("demo")))
    parser.add_argument("--out", default="runs/ship_reference")
    args = parser.parse_args()
    start = time.perf_counter()
    config = load_config(args.config)
    out = Path(args.out)
    manifest, train, holdout = phantom_world(config, out)
    info = ensure_reference(config, train, holdout, out)
    if SHIP.exists():
        shutil.rmtree(SHIP)
    shutil.copytree(out / "reference", SHIP)
    write_json(
        SHIP / "trained_on.json",
        {
            "manifest_sha256": sha256_file(manifest),
            "command": "python bench/ship_reference.py " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d"),
            "wall_s": round(time.perf_counter() - start, 1),
        },
        kind="reference-training-data",
    )
    print(json.dumps(info["holdout"], indent=1))


if __name__ == "__main__":
    main()
