"""Give the shipped phantom generator the per-class guidance chosen on holdout, and re-measure
its quality record with it (sampling settings only: the weights are not touched).

    python bench/set_class_guidance.py --chosen bench/results/class_guidance_cpu_<date>.json
        [--samples-per-class 16] [--out runs/set_class_guidance] [--ship]

Reads the scales ``bench/class_guidance.py`` chose on world A's ``holdout``, re-saves the
generator with them in its ``inference.json`` (weight files must come out byte-identical, or
nothing is written), scores it as ``bench/pretrained_phantom.py`` does (reference classifier
on the demo phantoms' ``holdout``) and, with ``--ship``, replaces the shipped ``inference.json``,
``config.json`` and ``quality.json`` and records the new sha256 in ``TRAINING.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from phantom_world import phantom_world
from pretrained_phantom import meets_targets, record_new_sha

from synthct.artifacts import read_json, write_json
from synthct.checkpoint import generator_sha256, load_generator, save_generator
from synthct.config import load_config, packaged_config_path
from synthct.eval.generator_quality import generator_report
from synthct.pretrained import load_phantom_reference, phantom_dir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chosen", type=Path, required=True)
    p.add_argument("--samples-per-class", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("runs/set_class_guidance"))
    p.add_argument("--ship", action="store_true")
    args = p.parse_args()
    here = "cd bench && " if Path.cwd().name == "bench" else ""  # as run, from the repo root
    command = f"{here}python {' '.join(sys.argv)}"
    shipped = phantom_dir() / "generator"
    before = generator_sha256(shipped)
    chosen = {c: row["guidance"] for c, row in read_json(args.chosen)["chosen_on_A"].items()}
    gen = load_generator(shipped)
    sampling = gen.config.sampling.model_copy(update={"class_guidance": chosen})
    gen.config = gen.config.model_copy(update={"sampling": sampling})
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "generator"
        trained = read_json(shipped / "config.json").get("trained")
        save_generator(gen, staged, extra={"trained": trained}, sampling_only=True)
        for weights in shipped.rglob("*.safetensors"):
            if (staged / weights.relative_to(shipped)).read_bytes() != weights.read_bytes():
                print(f"{weights}: re-saved weights differ; nothing written", file=sys.stderr)
                return 1
        config = load_config(packaged_config_path("demo"))
        _, _, holdout = phantom_world(config, args.out)
        reference = load_phantom_reference(config.labels.vocabulary_hash)
        report = generator_report(
            load_generator(staged), reference, holdout, per_class=args.samples_per_class
        )
        report = {"date": time.strftime("%Y-%m-%d"), "device": "cpu", **report}
        report["targets_met"] = meets_targets(report)
        report["command"] = command
        print(json.dumps(report, indent=1))
        if not args.ship:
            return 0
        for name in ("inference.json", "config.json", "autoencoder/config.json"):
            shutil.copy2(staged / name, shipped / name)
    write_json(phantom_dir() / "quality.json", report, kind="pretrained-quality")
    record_new_sha(
        before,
        f"per-class guidance {json.dumps(chosen)} chosen on holdout (`{args.chosen}`), set by "
        f"`{command}`; weights byte-identical; quality.json re-measured with it",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
