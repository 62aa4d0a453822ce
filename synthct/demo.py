"""``synthct demo``: the main job, stage by stage, on the embedded phantom sites.

Stages so far: phantom sites -> manifest check -> model-ready loading of every split ->
reference classifier (real ``train`` only, the shipped one or trained with FedAvg; its
holdout accuracy shows the classes are learnable from the images) -> federated generator (Flower simulation: a few rounds fine-tuning
the shipped pretrained phantom generator, or the config's whole schedule with
``--from-scratch`` or when no matching pretrained generator ships) -> synthetic cohort (per
site, what it lacks) -> gate (``RUN/gate.json``, signed with ``RUN/keys/gate.key``; a failed
gate is a valid result) ->
downstream (federated classifiers on real data, and on real + the cohort only if it passed;
evaluated per site on the real ``test`` split) -> site plugin (the site with the most rare
cases trains a LoRA plugin on its own ``train`` split, asynchronously, after the rounds; it is
validated into a registry and fused) -> ``RUN/report.html``.
Each later capability (federated generator, cohort, gate, downstream, report) adds a stage.
A stage that errors stops the demo with a non-zero exit naming it.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from rich.table import Table

from synthct.artifacts import atomic_write_text, write_json
from synthct.config import SynthctConfig, load_config, resolve_config_path
from synthct.progress import console, progress_bar

if TYPE_CHECKING:
    import torch

__all__ = ["run_demo"]

logger = logging.getLogger(__name__)


class StageError(RuntimeError):
    def __init__(self, stage: str, cause: BaseException) -> None:
        super().__init__(f"stage '{stage}' failed: {cause}")
        self.stage = stage


STAGES = (
    "phantom sites",
    "manifest check",
    "load splits",
    "reference classifier",
    "federated generator",
    "synthetic cohort",
    "gate",
    "downstream",
    "site plugin",
    "report",
)


# Stage wall times of the default demo on 2 CPU cores (bench/demo.py, 2026-11-24, shipped
# generator and reference). The whole-run ETA scales what is left by how fast the finished
# stages ran compared with these.
TYPICAL_STAGE_S = {
    "phantom sites": 8.0,
    "manifest check": 0.3,
    "load splits": 1.2,
    "reference classifier": 1.0,
    "federated generator": 98.0,
    "synthetic cohort": 66.0,
    "gate": 15.0,
    "downstream": 32.0,
    "site plugin": 60.0,
    "report": 2.0,
}


def remaining_s(timings: dict[str, float]) -> float | None:
    """Estimated seconds left after the stages in ``timings``: the typical times of the
    remaining stages times (actual / typical) of the finished ones, the ratio kept within
    0.1-10 so one odd stage cannot make it absurd. None before any stage has finished."""
    done = [name for name in STAGES if name in timings]
    if not done:
        return None
    ratio = sum(timings[n] for n in done) / sum(TYPICAL_STAGE_S[n] for n in done)
    left = sum(TYPICAL_STAGE_S[n] for n in STAGES if n not in timings)
    return min(max(ratio, 0.1), 10.0) * left


def _run_stage(name: str, timings: dict[str, float], fn: Callable[[], object]) -> object:
    """Run one stage under a header that places it in the whole run (k/N, time so far,
    about how long the rest takes)."""
    k = STAGES.index(name) + 1
    elapsed = sum(timings.values())
    left = remaining_s(timings)
    eta = f", about {left / 60:.1f} min left" if left is not None else ""
    console.rule(f"[bold]stage {k}/{len(STAGES)}: {name}[/]  ({elapsed:.0f} s so far{eta})")
    start = time.perf_counter()
    try:
        result = fn()
    except Exception as exc:  # a demo stage may fail for any reason; name it and stop
        raise StageError(name, exc) from exc
    timings[name] = round(time.perf_counter() - start, 2)
    return result


def run_demo(args: argparse.Namespace, device: torch.device | str = "cpu") -> int:
    """The demo's stages in order; ``device`` runs the cohort, the gate's reference models and
    the site plugin (the federated stages train on CPU in the simulation)."""
    run = Path(args.out)
    overrides = list(getattr(args, "set", None) or [])
    config_path = resolve_config_path(args.config or "demo")
    config: SynthctConfig = load_config(config_path, overrides)
    run.mkdir(parents=True, exist_ok=True)
    text = config_path.read_text(encoding="utf-8")
    if overrides:  # the run's config is the file with the overrides: write the validated whole
        text = f"# {config_path} with --set {' '.join(overrides)}\n" + yaml.safe_dump(
            config.model_dump(mode="json"), sort_keys=False
        )
    atomic_write_text(run / "config.yaml", text)
    seed = config.seed if args.seed is None else args.seed
    timings: dict[str, float] = {}
    try:
        manifest = _run_stage("phantom sites", timings, lambda: _make_sites(config, run, seed))
        _run_stage("manifest check", timings, lambda: _check(manifest, config))
        counts = _run_stage("load splits", timings, lambda: _load_all(manifest, config))
        reference = _run_stage(
            "reference classifier", timings, lambda: _reference(manifest, config, run)
        )
        generator = _run_stage(
            "federated generator",
            timings,
            lambda: _generator(manifest, config, run, getattr(args, "from_scratch", False)),
        )
        cohort = _run_stage(
            "synthetic cohort", timings, lambda: _cohort(manifest, run, seed, device)
        )
        gate = _run_stage(
            "gate", timings, lambda: _gate(cohort, manifest, config, run, seed, device)
        )
        downstream = _run_stage(
            "downstream", timings, lambda: _downstream(manifest, config, run, cohort, gate)
        )
        plugin = _run_stage(
            "site plugin", timings, lambda: _plugin(manifest, config, run, seed, device)
        )
        summary = {
            "seed": seed,
            "generator": generator,
            "gate": {"verdict": gate["verdict"], "failed_rules": gate["failed_rules"]},
            "downstream": {
                arm: {k: v for k, v in data["summary"].items() if k != "per_site_balanced_accuracy"}
                for arm, data in downstream["arms"].items()
            },
            "utility": _utility_line(downstream),
            "site plugin": {k: v for k, v in plugin.items() if not k.endswith("samples")},
            "stages_s": timings,
        }
        report = _run_stage(
            "report",
            timings,
            lambda: _report(manifest, config, run, cohort, gate, downstream, summary, plugin),
        )
    except StageError as exc:
        console.print(f"[red]synthct demo: {exc}")
        return 1
    table = Table(title="demo data: cases per site and split")
    table.add_column("site")
    for split in ("train", "holdout", "test"):
        table.add_column(split, justify="right")
    for site in config.site_names:
        table.add_row(site, *(str(counts.get((site, s), 0)) for s in ("train", "holdout", "test")))
    console.print(table)
    holdout = reference.get("holdout", {})
    console.print(
        f"reference classifier (real train only): holdout accuracy {holdout.get('accuracy', float('nan')):.3f} "
        f"on {holdout.get('cases', 0)} cases; per class {holdout.get('per_class_recall', {})}"
    )
    console.print(
        f"federated generator ({generator['origin']}): {generator['rounds']} rounds, "
        f"last round loss per site {generator['last_losses']}"
    )
    _print_gate_summary(gate)
    from synthct.pipeline.downstream import downstream_table

    console.print(downstream_table(downstream))
    if summary["utility"]:
        console.print(summary["utility"])
    console.print(
        f"site plugin from {plugin['site']}"
        + (" (a late joiner)" if plugin["late_joiner"] else "")
        + f": {plugin['plugin_bytes'] / 1e3:.0f} KB ({plugin['share_of_generator_update']:.1%} "
        f"of a generator update), trained in {plugin['train_s']:.0f} s; conditional accuracy "
        f"base {plugin['base']['mean']:.2f} -> fused {plugin['fusion']['mean']:.2f}"
        + (
            f"; radiomics KID to its own scans {plugin['base']['kid_radiomics_to_site']:.2f} -> "
            f"{plugin['fusion']['kid_radiomics_to_site']:.2f}"
            if "kid_radiomics_to_site" in plugin["base"]
            else ""
        )
    )
    write_json(
        run / "demo.json",
        {
            "stages_s": timings,
            "seed": seed,
            "reference": reference,
            "generator": generator,
            "cohort": {"manifest": str(cohort), "cases": gate["cohort"]["cases"]},
            "gate": {
                "verdict": gate["verdict"],
                "failed_rules": gate["failed_rules"],
                "flags": len(gate["flags"]),
            },
            "downstream": {arm: data["summary"] for arm, data in downstream["arms"].items()},
            "synthetic_effect": downstream.get("effect"),
            "utility": downstream.get("utility"),
            "site_plugin": summary["site plugin"],
        },
        kind="demo-summary",
    )
    console.print(f"stage times (s): {timings}")
    console.print(f"report: {report}")
    return 0


def _cohort(manifest: Path, run: Path, seed: int, device: torch.device | str = "cpu") -> Path:
    """Per site, the classes it lacks (the rare class above all), from the run's generator."""
    from synthct.pipeline.cohort import make_cohort

    with progress_bar("cohort") as update:
        cohort = make_cohort(
            run / "generator",
            manifest,
            run / "cohort",
            per_site=True,
            seed=seed,
            progress=update,
            device=device,
        )
    if cohort.manifest is None:  # every demo site lacks the rare class: never empty
        raise RuntimeError(f"{manifest}: the sites lack nothing; the demo has no cohort to make")
    return cohort.manifest


def _gate(
    cohort: Path,
    manifest: Path,
    config: SynthctConfig,
    run: Path,
    seed: int,
    device: torch.device | str = "cpu",
) -> dict:
    """Judge the cohort against the sites' real train/holdout; a fail is a valid result."""
    from synthct.pipeline.gate import judge_cohort
    from synthct.reference import load_reference

    reference = load_reference(run / "reference", vocabulary_hash=config.labels.vocabulary_hash)
    reference.to(device)
    return judge_cohort(
        cohort,
        run / "gate.json",
        config=config,
        reference=reference,
        train_manifest=manifest,
        holdout_manifest=manifest,
        seed=seed,
        sign_with=_gate_key(run)[0],
    )


def _gate_key(run: Path) -> tuple[Path, Path]:
    """The demo gate's signing key pair (``RUN/keys/gate.key``, ``gate.pub``), made once."""
    from synthct.signing import make_signing_key

    private, public = run / "keys" / "gate.key", run / "keys" / "gate.pub"
    if not (private.is_file() and public.is_file()):
        private.unlink(missing_ok=True)
        public.unlink(missing_ok=True)
        private, public = make_signing_key(run / "keys", "gate")
    return private, public


def _utility_line(downstream: dict) -> str | None:
    """The utility rule's verdict in one sentence (None when the cohort was not used)."""
    utility = downstream.get("utility")
    if utility is None:
        return None
    if utility["passed"] is False:
        return (
            "utility rule FAILED on holdout, the cohort is not to be used (the real-only arm "
            f"is the result): {utility['reason']}"
        )
    return f"utility rule on holdout: {utility['reason']}"


def _downstream(manifest: Path, config: SynthctConfig, run: Path, cohort: Path, gate: dict) -> dict:
    """Federated classifiers, real-only and (if the gate passed) real + synthetic; one seed."""
    from synthct.pipeline.downstream import run_downstream

    down = config.downstream.model_copy(update={"seeds": config.downstream.seeds[:1]})
    config = config.model_copy(update={"downstream": down})
    use = cohort.parent if gate["verdict"] == "pass" else None
    with progress_bar("downstream") as update:
        return run_downstream(
            config,
            manifest,
            run / "downstream",
            cohort_dir=use,
            gate_json=run / "gate.json",  # the signed verdict, checked against the demo's key
            trusted_keys=[_gate_key(run)[1]],
            federated=True,
            progress=update,
        )


def _plugin(
    manifest: Path,
    config: SynthctConfig,
    run: Path,
    seed: int,
    device: torch.device | str = "cpu",
) -> dict:
    """A site joins after the rounds (``synthct.pipeline.late_site``): its plugin on the run's
    generator, accepted into ``RUN/plugins/registry``, before and after in its own style."""
    from synthct.pipeline.late_site import late_site_plugin
    from synthct.reference import load_reference

    reference = load_reference(run / "reference", vocabulary_hash=config.labels.vocabulary_hash)
    return late_site_plugin(
        manifest, config, run, reference, seed=seed, device=device, progress=progress_bar
    )


def _report(
    manifest: Path,
    config: SynthctConfig,
    run: Path,
    cohort: Path,
    gate: dict,
    downstream: dict,
    summary: dict,
    plugin: dict | None = None,
) -> Path:
    """The self-contained ``RUN/report.html`` (phantoms: real volumes are shown too)."""
    from synthct.pipeline.report import write_run_report

    return write_run_report(
        run,
        config=config,
        real_manifest=manifest,
        cohort_manifest=cohort,
        gate=gate,
        downstream=downstream,
        summary=summary,
        plugin=plugin,
        title="synthct demo: federated synthetic CT on four phantom hospitals",
    )


def _print_gate_summary(report: dict) -> None:
    from synthct.eval.gate import gate_table

    console.print(gate_table(report))
    if report["verdict"] != "pass":
        console.print(
            "the cohort failed the gate: synthetic data will not be used downstream "
            f"(failed: {', '.join(report['failed_rules'])})"
        )


def _make_sites(config: SynthctConfig, run: Path, seed: int) -> Path:
    from synthct.data.phantoms import write_phantom_sites

    with progress_bar("phantoms") as update:
        return write_phantom_sites(config, run / "data", seed=seed, progress=update)


def _check(manifest: Path, config: SynthctConfig) -> None:
    from synthct.data.manifest import check_manifest

    problems = check_manifest(manifest, config)
    if problems:
        raise ValueError("; ".join(problems[:5]))


def _load_all(manifest: Path, config: SynthctConfig) -> Counter:
    from synthct.data.dataset import load_cases

    counts: Counter = Counter()
    with progress_bar("load") as update:
        cases = load_cases(manifest, config, splits=("train", "holdout", "test"), progress=update)
    from synthct.data.manifest import read_manifest

    for row in read_manifest(manifest):
        counts[(row.site, row.split)] += 1
    logger.info("loaded %d volumes of shape %s", len(cases), tuple(cases.images.shape[1:]))
    return counts


def _reference(manifest: Path, config: SynthctConfig, run: Path) -> dict:
    """The shipped reference models when the phantoms are the ones they were trained on;
    otherwise trained federatedly (FedAvg through Flower), as sites that cannot pool would."""
    from synthct.pipeline.reference import reference_for_sites

    return reference_for_sites(config, manifest, run / "reference", seed=config.seed).info


def _generator(manifest: Path, config: SynthctConfig, run: Path, from_scratch: bool) -> dict:
    from synthct.pipeline.generator import (
        federated_summary,
        matching_pretrained,
        train_generator,
    )

    initial = None if from_scratch else matching_pretrained(config)
    if initial is not None:
        config = config.model_copy(update={"federated": config.federated.finetune_schedule()})
    fed = config.federated
    total = fed.ae_rounds + fed.decoder_rounds + fed.diffusion_rounds
    with progress_bar("federated", total=total) as update:
        done = {"n": 0}

        def report(phase: str, _round: int, _total: int, **m: float) -> None:
            done["n"] += 1
            update(done["n"], total, phase=phase, **{k: v for k, v in m.items() if v is not None})

        train_generator(
            config,
            manifest,
            run,
            resume=(run / "fed_state.json").is_file(),
            initial=initial,
            progress=report,
        )
    origin = "fine-tuned shipped pretrained" if initial is not None else "from scratch"
    return {"origin": origin, **federated_summary(run)}
