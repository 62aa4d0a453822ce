"""The ``synthct`` command line. Heavy imports (torch, MONAI, Flower) happen inside commands."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

from synthct import __version__
from synthct.errors import UsageError

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_GATE_FAILED = 0, 1, 2, 3

logger = logging.getLogger("synthct")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (counts, steps, batch sizes, rounds)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (guidance scale, minutes)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def _config(path: str | None, overrides: list[str] | None = None):
    """The config a command runs under: ``--config`` (a path or a packaged name; default
    demo) with its ``--set KEY=VALUE`` overrides, validated together."""
    from synthct.config import load_config

    return load_config(path or "demo", overrides)


def _config_options(p: argparse.ArgumentParser, what: str = "the run's settings") -> None:
    p.add_argument(
        "--config",
        metavar="YAML|NAME",
        help=f"config for {what}: a YAML path or a packaged name (demo, smoke); default demo",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.batch_size=2 (repeatable; validated "
        "like the file)",
    )


def cmd_phantoms(args: argparse.Namespace) -> int:
    from synthct.data.phantoms import write_phantom_sites
    from synthct.progress import progress_bar

    config = _config(args.config, args.set)
    with progress_bar("phantoms") as update:
        manifest = write_phantom_sites(config, args.out, seed=args.seed, progress=update)
    print(f"wrote {manifest}")
    return EXIT_OK


def cmd_data_check(args: argparse.Namespace) -> int:
    from synthct.data.manifest import check_manifest, read_manifest

    config = _config(args.config, args.set) if args.config or args.set else None
    problems = check_manifest(args.manifest, config)
    if problems:
        print(f"{args.manifest}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        return EXIT_BAD_INPUT
    rows = read_manifest(args.manifest)
    counts = Counter((r.site, r.split) for r in rows)
    print(f"{args.manifest}: OK, {len(rows)} volumes")
    for (site, split), n in sorted(counts.items()):
        print(f"  {site:>12} {split:>8}: {n}")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from synthct.progress import progress_bar
    from synthct.trainer import train_central

    config = _config(args.config, args.set)
    if args.device:
        config = config.model_copy(
            update={"train": config.train.model_copy(update={"device": args.device})}
        )
    manifest = Path(args.data) if args.data else None
    run = Path(args.out)
    run.mkdir(parents=True, exist_ok=True)
    if manifest is None:
        from synthct.data.phantoms import write_phantom_sites

        manifest = run / "data" / "manifest.csv"
        if not manifest.is_file():
            write_phantom_sites(config, run / "data")
    with progress_bar("train") as update:

        def report(phase: str, done: int, total: int, **m: float) -> None:
            update(done, total, phase=phase, **m)

        if args.central:
            train_central(
                config,
                manifest,
                run,
                resume=args.resume,
                budget_min=args.budget_min,
                progress=report,
            )
        else:
            from synthct.fed.simulation import train_federated

            train_federated(
                config,
                manifest,
                run,
                resume=args.resume,
                budget_min=args.budget_min,
                max_rounds=args.max_rounds,
                progress=report,
            )
    print(f"generator: {run / 'generator'}")
    return EXIT_OK


def _generator_dir(run: str) -> Path:
    """``RUN`` (its ``generator/``), a generator folder itself, or ``pretrained``."""
    if run == "pretrained":
        from synthct.pretrained import phantom_dir

        return phantom_dir() / "generator"
    path = Path(run)
    return (
        path
        if (path / "config.json").is_file() and not (path / "generator").is_dir()
        else path / "generator"
    )


def _with_plugins(gen, gen_dir: Path, args: argparse.Namespace):
    """(generator, denoiser or None, provenance note) after applying a plugin registry, with
    merge weights from case counts or fitted on ``--fit-weights``' train cases."""
    if not args.plugins:
        if args.fit_weights:
            from synthct.plugins.adapter import PluginError

            raise PluginError("--fit-weights needs --plugins")
        return gen, None, None
    from synthct.plugins.merge import MixtureDenoiser, fuse
    from synthct.plugins.registry import load_plugins

    plugins = load_plugins(args.plugins, gen, gen_dir)
    weights = None
    fitted = ""
    if args.fit_weights:
        from synthct.data.dataset import load_cases
        from synthct.plugins.fit import fit_fusion_weights, fit_mixture_weights, validation_draws

        draws = validation_draws(gen, load_cases(args.fit_weights, gen.config))
        fit = (fit_fusion_weights if args.merge == "fusion" else fit_mixture_weights)(
            gen, plugins, draws
        )
        weights = fit.weights
        fitted = f";fitted={json.dumps(fit.summary())}"
    note = f"{args.merge}({','.join(p.name for p in plugins)}){fitted}"
    if args.merge == "fusion":
        return fuse(gen, plugins, None if weights is None else weights.tolist()), None, note
    return gen, MixtureDenoiser(gen, plugins, weights), note


def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from synthct.artifacts import write_json
    from synthct.checkpoint import generator_sha256, load_generator
    from synthct.data.volume_io import write_nifti
    from synthct.sampling import (
        inference_settings,
        labels_to_indices,
        sample_volumes,
        sites_to_indices,
    )
    from synthct.training import resolve_device

    device = resolve_device(args.device)
    gen_dir = _generator_dir(args.run)
    gen = load_generator(gen_dir, device)
    gen, denoiser, _note = _with_plugins(gen, gen_dir, args)
    try:
        labels = labels_to_indices(gen, [args.label] * args.n)
        sites_to_indices(gen, [args.site])  # an unknown site fails before any work
        sites = [args.site] * args.n
    except (ValueError, KeyError) as exc:
        print(f"synthct: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out = Path(args.out)
    stem = f"{args.label}_{args.site or 'pooled'}_seed{args.seed}"
    names = [f"{stem}_{i:04d}.nii.gz" for i in range(args.n)]
    taken = [n for n in [*names, f"{stem}.json"] if (out / n).exists()]
    if taken:  # another run's volumes are never overwritten or mixed with these
        raise UsageError(f"--out {out}: already holds {taken[0]} (use another --out or --seed)")
    settings = inference_settings(gen, args.sampler, args.steps, args.guidance)
    volumes = sample_volumes(
        gen,
        labels,
        **settings,
        generator=torch.Generator().manual_seed(args.seed),
        device=device,
        denoiser=denoiser,
        sites=sites,
    )
    for name, vol in zip(names, volumes, strict=True):
        write_nifti(out / name, vol[0].numpy(), gen.config.data.spacing_mm)
    provenance = {
        "generator_sha256": generator_sha256(gen_dir),
        "plugins": _note,
        "label": args.label,
        "site": args.site,
        "seed": args.seed,
        **settings,
        "files": names,
    }
    write_json(out / f"{stem}.json", provenance, kind="synthct-samples")
    print(f"wrote {len(volumes)} volumes and {stem}.json to {out}")
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    from synthct.checkpoint import load_generator
    from synthct.cohort import generate_cohort, parse_counts, plan_cohort, reference_counts
    from synthct.progress import progress_bar
    from synthct.training import resolve_device

    device = resolve_device(args.device)
    gen_dir = _generator_dir(args.run)
    gen = load_generator(gen_dir, device)
    gen, denoiser, note = _with_plugins(gen, gen_dir, args)
    classes = list(gen.config.labels.classes)
    target = parse_counts(args.counts, classes) if args.counts else "balanced"
    counts = reference_counts(args.reference, gen.config)
    plan = plan_cohort(counts, classes, target=target, per_site=args.per_site)
    if not plan:
        print("synthct: nothing to generate: the reference is already balanced", file=sys.stderr)
        return EXIT_OK
    with progress_bar("generate", len(plan)) as update:
        manifest = generate_cohort(
            gen,
            gen_dir,
            plan,
            args.out,
            seed=args.seed,
            sampler=args.sampler,
            steps=args.steps,
            guidance=args.guidance,
            batch_size=args.batch_size,
            device=device,
            progress=update,
            denoiser=denoiser,
            plugins=note,
            volume_format=args.format,
        )
    by_class = Counter(c.label for c in plan)
    print(f"cohort: {manifest} ({len(plan)} cases: {dict(by_class)})")
    return EXIT_OK


def cmd_reference(args: argparse.Namespace) -> int:
    """Train the frozen real-only reference classifier/encoder the gate and quality checks use:
    on the pooled ``train`` split, or federatedly (FedAvg; each site reads only its rows)."""
    from synthct.reference import save_reference

    config = _config(args.config, args.set)
    manifest = Path(args.manifest)
    if not manifest.is_file():
        from synthct.data.manifest import ManifestError

        raise ManifestError(f"{manifest}: manifest not found")
    out = Path(args.out)
    if args.federated:
        from synthct.fed.reference_app import train_reference_federated

        model = train_reference_federated(config, manifest, out / "federated", seed=args.seed)
    else:
        from synthct.data.dataset import load_cases
        from synthct.progress import progress_bar
        from synthct.reference import train_reference

        train = load_cases(manifest, config, splits=("train",))
        holdout = load_cases(manifest, config, splits=("holdout",))
        with progress_bar("reference") as update:
            model = train_reference(
                train,
                classes=list(config.labels.classes),
                vocabulary_hash=config.labels.vocabulary_hash,
                epochs=config.train.reference_epochs,
                seed=args.seed,
                holdout=holdout,
                progress=lambda done, total, **m: update(done, total, **m),
            )
    save_reference(model, out)
    holdout = model.info.get("holdout", {})
    print(
        f"reference ({model.info.get('trained', 'central')}): {out}; holdout accuracy "
        f"{holdout.get('accuracy', float('nan')):.3f}, balanced {holdout.get('balanced_accuracy', float('nan')):.3f}"
    )
    return EXIT_OK


def cmd_gate(args: argparse.Namespace) -> int:
    from synthct.artifacts import read_json
    from synthct.eval.gate import (
        GateError,
        drop_flagged,
        load_real,
        load_rules,
        run_gate,
        write_gate,
    )
    from synthct.reference import load_reference

    config = _config(args.config, args.set)
    rules = load_rules(args.rules)
    if args.reference:
        reference = load_reference(args.reference, vocabulary_hash=config.labels.vocabulary_hash)
    else:
        from synthct.pretrained import load_phantom_reference

        reference = load_phantom_reference(config.labels.vocabulary_hash)
    cohort = Path(args.cohort)
    manifest = cohort / "manifest.csv" if cohort.is_dir() else cohort
    if args.federated:
        from synthct.fed.gate_app import run_gate_federated

        if not args.manifest:
            raise GateError("--federated needs --manifest (each site reads only its own rows)")
        if not manifest.is_file():
            raise GateError(f"{manifest}: no cohort manifest")
        report = run_gate_federated(
            manifest,
            args.manifest,
            config=config,
            reference=reference,
            run_dir=Path(args.out).resolve().parent / "gate_federated",
            rules=rules,
            seed=args.seed,
        )
    else:
        if not (args.train and args.holdout):
            raise GateError("the central gate needs --train and --holdout manifests")
        real = load_real(args.train, args.holdout, config=config, reference=reference)
        report = run_gate(
            manifest, real, config=config, reference=reference, rules=rules, seed=args.seed
        )
    write_gate(report, args.out, sign_with=args.sign)
    _print_gate(report)
    if args.drop_flagged:
        kept = drop_flagged(manifest.parent, read_json(args.out), args.drop_flagged)
        print(f"unflagged cases written to {kept} ({len(report['flags'])} dropped); gate it again")
    return EXIT_OK if report["verdict"] == "pass" else EXIT_GATE_FAILED


def _print_gate(report: dict) -> None:
    from synthct.eval.gate import gate_table
    from synthct.progress import console

    console.print(gate_table(report))
    for flag in report["flags"][:10]:
        console.print(f"flagged {flag['path']}: {'; '.join(flag['reasons'])}")
    if len(report["flags"]) > 10:
        console.print(f"... and {len(report['flags']) - 10} more flagged (see the gate report)")


def cmd_downstream(args: argparse.Namespace) -> int:
    from synthct.pipeline.downstream import downstream_table, run_downstream
    from synthct.progress import console, progress_bar

    config = _config(args.config, args.set)
    if args.seeds:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            print(f"synthct: error: --seeds {args.seeds!r}: expected e.g. 0,1,2", file=sys.stderr)
            return EXIT_BAD_INPUT
        config = config.model_copy(
            update={"downstream": config.downstream.model_copy(update={"seeds": seeds})}
        )
    with progress_bar("downstream") as update:
        results = run_downstream(
            config,
            args.real,
            args.out,
            cohort_dir=args.cohort,
            gate_json=args.gate,
            federated=args.federated,
            force_ungated=args.force_ungated,
            trusted_keys=args.trusted_key,
            progress=update,
        )
    changed = (results.get("gate") or {}).get("rules_changed")
    if changed:
        console.print(f"[yellow]the cohort's gate used non-default rules: {changed}")
    if results["ungated"]:
        console.print("[bold red]UNGATED: the cohort did not pass (or was changed after) the gate")
    console.print(downstream_table(results))
    print(f"results: {Path(args.out) / 'results.json'}")
    return EXIT_OK


def cmd_plugin_train(args: argparse.Namespace) -> int:
    from synthct.checkpoint import load_generator
    from synthct.data.dataset import load_cases
    from synthct.plugins.adapter import export_plugin, train_plugin
    from synthct.progress import progress_bar

    gen_dir = _generator_dir(args.run)
    gen = load_generator(gen_dir)
    cfg = gen.config.plugins.model_copy(
        update={
            k: v
            for k, v in (("rank", args.rank), ("steps", args.steps), ("targets", args.targets))
            if v
        }
    )
    cases = load_cases(args.data, gen.config, splits=("train",), sites=(args.site,))
    if len(cases) == 0:
        print(f"synthct: error: {args.data}: no train cases of site {args.site!r}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with progress_bar(f"plugin {args.site}", cfg.steps) as update:
        unet = train_plugin(gen, cases, cfg, seed=args.seed, progress=update)
    out = export_plugin(
        unet, args.out, gen=gen, generator_dir=gen_dir, site=args.site, cases=cases, cfg=cfg
    )
    size = (out / "plugin.safetensors").stat().st_size
    print(f"plugin: {out} ({size / 1024:.0f} KiB)")
    return EXIT_OK


def cmd_plugin_add(args: argparse.Namespace) -> int:
    from synthct.checkpoint import load_generator
    from synthct.plugins.registry import add_plugin

    gen_dir = _generator_dir(args.run)
    plugin = add_plugin(args.registry, args.plugin, load_generator(gen_dir), gen_dir)
    print(f"registered {plugin.name} in {args.registry}")
    return EXIT_OK


def cmd_plugin_list(args: argparse.Namespace) -> int:
    from synthct.plugins.registry import list_plugins

    for row in list_plugins(args.registry):
        seen = ", ".join(f"{k}:{v}" for k, v in row["classes_seen"].items() if v)
        print(
            f"{row['name']}  site={row['site']} rank={row['rank']} {row['targets']} "
            f"{row['weights_bytes'] / 1024:.0f} KiB  classes {seen}  ({row['created']})"
        )
    return EXIT_OK


def cmd_fed_app(args: argparse.Namespace) -> int:
    from synthct.fed.deployment import write_flower_app

    path = write_flower_app(args.dir, config=args.config, out=args.out)
    print(f"wrote {path}; run it with: flwr run {args.dir} <superlink-connection> --stream")
    return EXIT_OK


def cmd_fed_certs(args: argparse.Namespace) -> int:
    from synthct.fed.deployment import write_tls_certificates

    files = write_tls_certificates(args.dir, args.host)
    print("wrote " + ", ".join(str(p) for p in files.values()))
    print("SuperLink: --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key")
    print("each site: flower-supernode --root-certificates ca.crt")
    return EXIT_OK


def cmd_fed_keys(args: argparse.Namespace) -> int:
    from synthct.fed.deployment import write_supernode_keys

    private, public = write_supernode_keys(args.dir, args.site)
    print(f"site keeps {private} (flower-supernode --auth-supernode-private-key)")
    print(f"operator registers {public}: flwr supernode register {public} <connection>")
    return EXIT_OK


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Every audit log named (or found under a folder) checked along its hash chain."""
    from synthct.audit import AuditError, verify_against_server, verify_chain

    logs = []
    for given in map(Path, args.paths):
        logs += sorted(given.rglob("audit.jsonl")) if given.is_dir() else [given]
    if not logs:
        raise AuditError(f"no audit.jsonl under {', '.join(args.paths)}")
    reported = _reported_chains(Path(args.rounds)) if args.rounds else None
    for log in logs:
        records, head = verify_chain(log)
        note = ""
        if reported is not None:
            site = _log_site(log)
            verify_against_server(log, reported.get(site, []))
            note = f"; all {len(reported.get(site, []))} heads the server logged for {site} found"
        print(f"{log}: OK, {records} records, head {head[:16]}{note}")
    return EXIT_OK


def _reported_chains(rounds_log: Path) -> dict[str, list[tuple[int, str]]]:
    """Per site, the (round, audit chain) pairs a server's ``rounds.jsonl`` recorded."""
    if not rounds_log.is_file():
        raise UsageError(f"--rounds {rounds_log}: no such file")
    out: dict[str, list[tuple[int, str]]] = {}
    for line in rounds_log.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        for site in entry.get("sites", []):
            if site.get("audit_chain"):
                out.setdefault(site["site"], []).append((entry["round"], site["audit_chain"]))
    return out


def _log_site(log: Path) -> str:
    """The site an audit log belongs to (its records say)."""
    for line in log.read_text(encoding="utf-8").splitlines():
        return str(json.loads(line).get("site", log.parent.name))
    return log.parent.name


def cmd_keys(args: argparse.Namespace) -> int:
    from synthct.signing import make_signing_key

    private, public = make_signing_key(args.dir, args.name)
    print(f"wrote {private} (keep it with the gate) and {public} (give it to downstream users)")
    return EXIT_OK


def cmd_config_show(args: argparse.Namespace) -> int:
    """The whole validated config (every default filled in) as YAML."""
    import yaml

    config = _config(args.config, args.set)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return EXIT_OK


def cmd_config_validate(args: argparse.Namespace) -> int:
    config = _config(args.config, args.set)
    sites = ", ".join(config.site_names) or "none"
    print(
        f"{args.config}: OK ({config.data.shape} voxels, classes {config.labels.classes}, sites {sites})"
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from synthct.demo import run_demo

    return run_demo(args)


def _sampling_options(p: argparse.ArgumentParser) -> None:
    """Sampler, steps and guidance; each defaults to the generator's own inference settings."""
    from synthct.config import SAMPLERS  # pydantic only: --help stays fast

    p.add_argument(
        "--sampler", choices=SAMPLERS, default=None, help="sampler (default: the generator's)"
    )
    p.add_argument(
        "--steps", type=positive_int, default=None, help="sampling steps (default: the generator's)"
    )
    p.add_argument(
        "--guidance",
        type=non_negative_float,
        default=None,
        help="classifier-free guidance scale (default: the generator's)",
    )


def _plugin_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugins", metavar="REGISTRY", help="apply a plugin registry")
    p.add_argument("--merge", choices=["fusion", "mixture"], default="fusion")
    p.add_argument(
        "--fit-weights",
        metavar="MANIFEST",
        help="fit the merge weights on this manifest's train cases (default: case counts)",
    )


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(prog="synthct", description=__doc__)
    parser.add_argument("--version", action="version", version=f"synthct {__version__}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="library log level (default WARNING)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="end-to-end demo on the embedded phantom sites")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    _config_options(p)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="train the generator from zero instead of fine-tuning the shipped one",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train reference models and the generator")
    _config_options(p)
    p.add_argument(
        "--data", help="manifest CSV (default: make the config's phantom sites in OUT/data)"
    )
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument(
        "--central",
        action="store_true",
        help="pool all sites' train split (default: federated, Flower simulation)",
    )
    p.add_argument(
        "--max-rounds",
        type=positive_int,
        default=None,
        help="federated: stop after this many rounds (resume with --resume)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument(
        "--budget-min", type=non_negative_float, default=None, help="wall-time budget in minutes"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample class-conditional volumes from a trained run")
    p.add_argument("--run", required=True)
    p.add_argument("--label", required=True, help="class name from the vocabulary")
    p.add_argument(
        "--site",
        default=None,
        help="render in this site's scanner style (site-conditioned generators; default: "
        "site-agnostic)",
    )
    p.add_argument("--n", type=positive_int, default=8, help="volumes to sample (default 8)")
    p.add_argument("--out", required=True)
    _sampling_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    _plugin_options(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("generate", help="generate a class-balanced synthetic cohort")
    p.add_argument("--run", required=True, help="training run, generator folder, or 'pretrained'")
    p.add_argument("--reference", required=True, help="manifest whose train counts set the deficit")
    p.add_argument("--target", choices=["balanced"], default="balanced")
    p.add_argument("--counts", help="explicit targets instead: label=n,label=n")
    p.add_argument("--per-site", action="store_true", help="plan per site: each gets what it lacks")
    p.add_argument("--out", required=True, help="cohort folder (rerun to resume)")
    _sampling_options(p)
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="volumes per batch (default 8)"
    )
    p.add_argument(
        "--format",
        choices=["nifti", "dicom"],
        default="nifti",
        help="one .nii.gz per case, or one CT series folder per case marked synthetic "
        "(default nifti)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    _plugin_options(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("plugin", help="site LoRA plugins: train, register, list")
    plug = p.add_subparsers(dest="plugin_command", required=True, metavar="PLUGIN_COMMAND")
    q = plug.add_parser("train", help="train a LoRA plugin on one site's data")
    q.add_argument("--run", required=True, help="base: run, generator folder or 'pretrained'")
    q.add_argument("--site", required=True)
    q.add_argument("--data", required=True, help="manifest holding the site's train cases")
    q.add_argument("--out", required=True, help="plugin folder")
    q.add_argument("--rank", type=positive_int, default=None, help="LoRA rank (default: config)")
    q.add_argument(
        "--steps", type=positive_int, default=None, help="training steps (default: config)"
    )
    q.add_argument("--targets", choices=["conv+linear", "attention+time"], default=None)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=cmd_plugin_train)
    q = plug.add_parser("add", help="validate a plugin and add it to a registry folder")
    q.add_argument("registry")
    q.add_argument("plugin")
    q.add_argument("--run", required=True, help="the base generator the registry serves")
    q.set_defaults(func=cmd_plugin_add)
    q = plug.add_parser("list", help="the plugins in a registry")
    q.add_argument("registry")
    q.set_defaults(func=cmd_plugin_list)

    p = sub.add_parser(
        "gate", help="score a cohort (fidelity, diversity, privacy, bias) and judge it"
    )
    p.add_argument("--cohort", required=True, help="cohort folder (with manifest.csv) or manifest")
    p.add_argument("--train", help="manifest with the real train split (central mode)")
    p.add_argument("--holdout", help="manifest with the real holdout split (central mode)")
    p.add_argument(
        "--federated",
        action="store_true",
        help="judge through Flower: each site scores the cohort on its own cases, sends aggregates",
    )
    p.add_argument("--manifest", help="federated mode: the sites' manifest (each reads its rows)")
    p.add_argument("--rules", help="YAML overriding rule thresholds (see README)")
    p.add_argument("--out", required=True, help="gate report JSON")
    _config_options(p, "the vocabulary, label maps and geometry")
    p.add_argument("--reference", help="reference model folder (default: shipped phantom one)")
    p.add_argument("--drop-flagged", metavar="DIR", help="also write the unflagged cases here")
    p.add_argument(
        "--sign",
        metavar="KEY",
        help="sign the verdict with this Ed25519 private key (made by `synthct keys`)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_gate, out_is_file=True)

    p = sub.add_parser(
        "reference", help="train the frozen reference classifier/encoder (central or federated)"
    )
    p.add_argument("--manifest", required=True, help="the sites' manifest (train + holdout)")
    p.add_argument("--out", required=True, help="reference model folder")
    p.add_argument(
        "--federated", action="store_true", help="FedAvg over the sites (Flower simulation)"
    )
    _config_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_reference)

    p = sub.add_parser("downstream", help="train classifiers on real (+ gated synthetic) data")
    p.add_argument("--real", required=True, help="manifest with train and test splits")
    p.add_argument("--cohort", help="synthetic cohort folder (needs a passing gate.json)")
    p.add_argument("--gate", help="gate report (default: COHORT/gate.json)")
    p.add_argument("--federated", action="store_true", help="FedAvg over the sites (Flower)")
    p.add_argument(
        "--force-ungated", action="store_true", help="use a cohort without a passing gate"
    )
    p.add_argument(
        "--trusted-key",
        action="append",
        default=None,
        metavar="PUB",
        help="accept only a gate verdict signed by this public key (repeatable)",
    )
    p.add_argument("--out", required=True)
    _config_options(p)
    p.add_argument("--seeds", help="comma-separated seeds (default: config downstream.seeds)")
    p.set_defaults(func=cmd_downstream)

    p = sub.add_parser("phantoms", help="write multi-site chest-CT phantoms + manifest.csv")
    _config_options(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=None, help="default: the config's seed")
    p.set_defaults(func=cmd_phantoms)

    p = sub.add_parser("data", help="data utilities")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = data_sub.add_parser("check", help="validate a manifest, reporting every problem at once")
    q.add_argument("manifest")
    _config_options(q, "the vocabulary, label maps and geometry")
    q.set_defaults(func=cmd_data_check)

    p = sub.add_parser("audit", help="site audit logs")
    audit_sub = p.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")
    q = audit_sub.add_parser(
        "verify", help="check audit logs' hash chains; names the first edited record (exit 2)"
    )
    q.add_argument("paths", nargs="+", help="audit.jsonl files or folders holding them")
    q.add_argument(
        "--rounds",
        metavar="ROUNDS_JSONL",
        help="the server's round log: every audit head a site reported must be in its log",
    )
    q.set_defaults(func=cmd_audit_verify)

    p = sub.add_parser("keys", help="an Ed25519 key pair for signing gate verdicts")
    p.add_argument("dir", help="folder for NAME.key (private, 0600) and NAME.pub")
    p.add_argument("--name", default="gate", help="key file name (default gate)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("config", help="show or validate a config")
    cfg_sub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    q = cfg_sub.add_parser("show", help="the whole validated config, defaults filled in, as YAML")
    _config_options(q)
    q.set_defaults(func=cmd_config_show)
    q = cfg_sub.add_parser("validate", help="check a config (and --set overrides); exit 2 if bad")
    q.add_argument("config", metavar="YAML|NAME")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    q.set_defaults(func=cmd_config_validate)

    p = sub.add_parser("fed", help="multi-machine Flower deployment helpers")
    fed = p.add_subparsers(dest="fed_command", required=True, metavar="FED_COMMAND")
    q = fed.add_parser("app", help="write the code-free Flower app directory for `flwr run`")
    q.add_argument("dir")
    q.add_argument("--config", default="demo", help="YAML path on the SuperLink machine or name")
    q.add_argument("--out", default="runs/federated", help="run directory on the SuperLink machine")
    q.set_defaults(func=cmd_fed_app)
    q = fed.add_parser("certs", help="a private CA and SuperLink TLS certificate")
    q.add_argument("dir")
    q.add_argument("--host", action="append", help="SuperLink host name or IP (repeatable)")
    q.set_defaults(func=cmd_fed_certs)
    q = fed.add_parser("keys", help="a SuperNode authentication key pair for one site")
    q.add_argument("dir")
    q.add_argument("--site", required=True)
    q.set_defaults(func=cmd_fed_keys)
    return parser


def _check_out(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` of the wrong kind before any work (a folder where a file is written,
    or a file where a folder is), so no result is computed only to be lost."""

    out = getattr(args, "out", None)
    if out is None:
        return
    path = Path(out)
    if getattr(args, "out_is_file", False):
        if path.is_dir():
            raise UsageError(
                f"--out {out}: is a folder; give the report's file name, e.g. {path / 'gate.json'}"
            )
    elif path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")


def main(argv: list[str] | None = None) -> int:
    from synthct.errors import SynthctError  # light: --help and argument errors stay fast

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_out(args)
        return int(args.func(args))
    except SynthctError as exc:
        print(f"synthct: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("synthct: interrupted; completed work is kept on disk", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
