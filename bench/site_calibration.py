"""Does a federated site-conditioned UNet carry each scanner's style once its site rows are
calibrated? (issue 26)

    python bench/site_calibration.py --run runs/site_calibration
        [--config bench/site_calibration.yaml] [--set KEY=VALUE ...]
        [--initial synthct/pretrained/phantom/generator] [--log FILE]

Trains in Flower's simulation on the demo sites, resumably (rerun the same command): the
config's diffusion rounds first, with ``federated.site_calibration_rounds`` set to 0; the
generator is then copied to ``RUN/before_calibration``; then the same run continues with the
config's calibration rounds, in which each site trains only its own site-embedding row against
the frozen EMA UNet (``RUN/generator`` afterwards). Gate both with ``bench/cohort_gate.py
--generator ...`` (the ``site_style`` rule and the per-site style distances).

Why: the central recipe put each site's cases nearest its own scans; the same recipe trained
federatedly lost two sites' style. In FedAvg a site's local steps move the shared weights toward
its own scanner, so its row need not learn the style, and averaging then removes it.

``--set`` overrides the config (as ``synthct --set``). To calibrate an already trained UNet
with more per-site capacity, start from it with no diffusion rounds and per-site norms (each
site then trains its own row of every GroupNorm's scale and shift too):
``--initial RUN/before_calibration --set federated.diffusion_rounds=0
federated.restart_unet=false unet.site_norms=true``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from phantom_world import phantom_manifest
from pretrained_phantom import log_round

from synthct.artifacts import read_json
from synthct.config import load_config
from synthct.fed.simulation import train_federated
from synthct.pretrained import phantom_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, default=Path("runs/site_calibration"))
    p.add_argument("--config", type=Path, default=Path("bench/site_calibration.yaml"))
    p.add_argument("--initial", type=Path, default=phantom_dir() / "generator")
    p.add_argument("--set", nargs="*", default=[], help="config overrides KEY.PATH=VALUE")
    args = p.parse_args()
    config = load_config(args.config, args.set)
    calibration = config.federated.site_calibration_rounds
    manifest = phantom_manifest(config, args.run)
    before = args.run / "before_calibration"
    state = args.run / "fed_state.json"
    if not before.is_dir():
        first = config.model_copy(
            update={"federated": config.federated.model_copy(update={"site_calibration_rounds": 0})}
        )
        train_federated(
            first,
            manifest,
            args.run,
            resume=state.is_file(),
            initial=args.initial,
            progress=log_round,
        )
        if read_json(state)["phase"] != "done":
            print("stopped before the diffusion rounds ended; rerun to resume")
            return
        shutil.copytree(args.run / "generator", before)
        print(f"{time.strftime('%H:%M:%S')} diffusion rounds done; copied to {before}")
    train_federated(config, manifest, args.run, resume=True, progress=log_round)
    print(f"{time.strftime('%H:%M:%S')} {calibration} calibration round(s) done: {args.run}")


if __name__ == "__main__":
    main()
