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
    spacings: list[tuple[str, tuple]] = []
    problems = check_manifest(args.manifest, config, spacings=spacings)
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
    if config is not None:
        from synthct.data.dataset import coarser_than_config, geometry_note

        coarse = [(p, s) for p, s in spacings if coarser_than_config(s, config)]
        if coarse:
            print(f"  warning: {geometry_note(args.manifest, coarse, len(rows), config)}")
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from synthct.progress import progress_bar
    from synthct.trainer import train_central

    config = _config(args.config, args.set)
    if args.device:
        config = config.model_copy(
            update={"train": config.train.model_copy(update={"device": args.device})}
        )
    if args.seed is not None:
        config = config.model_copy(update={"seed": args.seed})
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
    from synthct.artifacts import read_json

    privacy = read_json(run / "generator" / "config.json").get("privacy")
    if privacy and privacy["epsilon"] is not None:
        print(
            f"privacy: epsilon {privacy['epsilon']:.3g} at delta {privacy['delta']:g} per site, "
            f"{privacy['releases']} noised releases ({', '.join(privacy['phases'])}); "
            f"not covered: {'; '.join(privacy['not_covered'])}"
        )
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

    device = _device(args)
    gen_dir = _generator_dir(args.generator)
    gen = load_generator(gen_dir, device)
    gen, denoiser, _note = _with_plugins(gen, gen_dir, args)
    if args.site not in (None, "pooled") and not gen.renders_sites:
        raise UsageError(
            f"--site {args.site}: this generator is not site-conditioned (it renders every site "
            "alike); leave --site out"
        )
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

    device = _device(args)
    gen_dir = _generator_dir(args.generator)
    gen = load_generator(gen_dir, device)
    gen, denoiser, note = _with_plugins(gen, gen_dir, args)
    classes = list(gen.config.labels.classes)
    target = parse_counts(args.counts, classes) if args.counts else "balanced"
    counts = reference_counts(args.data, gen.config)
    plan = plan_cohort(counts, classes, target=target, per_site=args.per_site)
    if not plan:
        print("synthct: nothing to generate: the data is already balanced", file=sys.stderr)
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
    manifest = Path(args.data)  # that it is a manifest file: checked by main before any command
    out = Path(args.out)
    if args.federated:
        from synthct.fed.reference_app import train_reference_federated

        _device(args, federated=True)
        model = train_reference_federated(config, manifest, out / "federated", seed=args.seed)
    else:
        from synthct.data.dataset import load_cases
        from synthct.progress import progress_bar
        from synthct.reference import train_reference

        device = _device(args)
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
                device=device,
            )
    save_reference(model, out)
    holdout = model.info.get("holdout", {})
    print(
        f"reference ({model.info.get('trained', 'central')}): {out}; holdout accuracy "
        f"{holdout.get('accuracy', float('nan')):.3f}, balanced {holdout.get('balanced_accuracy', float('nan')):.3f}"
    )
    return EXIT_OK


def cmd_gate(args: argparse.Namespace) -> int:
    from synthct.data.manifest import read_manifest

    if args.device == "cuda":  # a device the run cannot have is refused first
        _device(args, federated=args.federated)
    cohort = Path(args.cohort)  # a mistake here is answered before the heavy imports
    if not cohort.exists():
        raise UsageError(f"--cohort {cohort}: no such cohort folder or manifest")
    manifest = cohort / "manifest.csv" if cohort.is_dir() else cohort
    read_manifest(manifest)  # a missing or unfinished cohort is refused before any work
    out = gate_path(args)

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
    if args.reference_model:
        reference = load_reference(
            args.reference_model, vocabulary_hash=config.labels.vocabulary_hash
        )
    else:
        from synthct.pretrained import load_phantom_reference

        reference = load_phantom_reference(config.labels.vocabulary_hash)
    reference.to(_device(args, federated=args.federated))  # federated: sites featurise
    if args.federated:
        from synthct.fed.gate_app import run_gate_federated

        if not args.data:
            raise GateError("--federated needs --data (each site reads only its own rows)")
        report = run_gate_federated(
            manifest,
            args.data,
            config=config,
            reference=reference,
            run_dir=out.resolve().parent / "gate_federated",
            rules=rules,
            seed=args.seed,
        )
    else:
        train = args.train_manifest or args.data
        holdout = args.holdout_manifest or args.data
        if not (train and holdout):
            raise GateError("the gate needs --data (a manifest with train and holdout splits)")
        real = load_real(train, holdout, config=config, reference=reference)
        report = run_gate(
            manifest, real, config=config, reference=reference, rules=rules, seed=args.seed
        )
    write_gate(report, out, sign_with=args.sign)
    _print_gate(report)
    print(f"gate report: {out}")
    if args.drop_flagged:
        kept = drop_flagged(manifest.parent, read_json(out), args.drop_flagged)
        print(f"unflagged cases written to {kept} ({len(report['flags'])} dropped); gate it again")
    return EXIT_OK if report["verdict"] == "pass" else EXIT_GATE_FAILED


def gate_path(args: argparse.Namespace) -> Path:
    """Where ``gate`` writes its report: ``OUT/gate.json``, by default in the cohort's folder
    (where ``downstream`` looks); an ``--out`` ending in ``.json`` is the old file form."""
    if args.out and args.out.endswith(".json"):
        return Path(args.out)
    if args.out:
        return Path(args.out) / "gate.json"
    cohort = Path(args.cohort)
    return (cohort if cohort.is_dir() else cohort.parent) / "gate.json"


def _print_gate(report: dict) -> None:
    from synthct.eval.gate import gate_table, not_evaluated_note
    from synthct.progress import console

    console.print(gate_table(report))
    note = not_evaluated_note(report)
    if note:
        print(note)
    for flag in report["flags"][:10]:
        console.print(f"flagged {flag['path']}: {'; '.join(flag['reasons'])}")
    if len(report["flags"]) > 10:
        console.print(f"... and {len(report['flags']) - 10} more flagged (see the gate report)")


def cmd_downstream(args: argparse.Namespace) -> int:
    from synthct.pipeline.downstream import downstream_table, run_downstream
    from synthct.progress import console, progress_bar

    config = _config(args.config, args.set)
    device = _device(args, federated=args.federated)
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
            args.data,
            args.out,
            cohort_dir=args.cohort,
            gate_json=args.gate,
            federated=args.federated,
            force_ungated=args.force_ungated,
            trusted_keys=args.trusted_key,
            progress=update,
            device=device,
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

    device = _device(args)
    gen_dir = _generator_dir(args.generator)
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
        unet = train_plugin(gen, cases, cfg, seed=args.seed, progress=update, device=device)
    out = export_plugin(
        unet, args.out, gen=gen, generator_dir=gen_dir, site=args.site, cases=cases, cfg=cfg
    )
    size = (out / "plugin.safetensors").stat().st_size
    print(f"plugin: {out} ({size / 1024:.0f} KiB)")
    return EXIT_OK


def cmd_plugin_add(args: argparse.Namespace) -> int:
    from synthct.checkpoint import load_generator
    from synthct.plugins.registry import add_plugin

    gen_dir = _generator_dir(args.generator)
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


def cmd_export_bundle(args: argparse.Namespace) -> int:
    from synthct.bundle import export_bundle

    out = Path(args.out)
    export_bundle(_generator_dir(args.generator), out)
    print(
        f"bundle: {out}; sample with python -m monai.bundle run --config_file "
        f"{out}/configs/inference.json --meta_file {out}/configs/metadata.json "
        f"--bundle_root {out} --labels \"['CLASS']\""
    )
    return EXIT_OK


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


def cmd_config_memory(args: argparse.Namespace) -> int:
    """Estimated accelerator memory per phase of a config (measured on the meta device)."""
    from synthct.models.memory import estimate_memory

    config = _config(args.config, args.set)
    rows = estimate_memory(config, batch_size=args.batch_size)
    print(
        f"{'phase':<14} {'batch':>5} {'input':<18} {'weights':>9} {'AdamW':>9} "
        f"{'activations':>12} {'total MiB':>10}"
    )
    for r in rows:
        shape = "x".join(str(v) for v in r.shape)
        print(
            f"{r.phase:<14} {r.batch:>5} {shape:<18} {r.weights_mib:>9.1f} "
            f"{r.optimizer_mib:>9.1f} {r.activations_mib:>12.1f} {r.total_mib:>10.1f}"
        )
    print(
        "fp32; bf16 autocast roughly halves activations; add the CUDA context (~0.4 GiB) "
        "and ~25 % for the allocator"
    )
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

    return run_demo(args, device=_device(args))


EXIT_TEXT = (
    "exit codes:\n"
    "  0  done\n"
    "  1  an unexpected error (a bug: please report it with the traceback)\n"
    "  2  a mistake in the input: one line naming the argument or file (--debug: traceback)"
)
OLD_NAMES_UNTIL = "0.3"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and appends every option's default to its help line."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or default == []
        ):
            return text
        return f"{text} (default: %(default)s)"


class RenamedOption(argparse.Action):
    """An option's old name, kept for one release: stores into the new option and says so."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(
            f"synthct: notice: {option_string} is now {self.new}; the old name works until "
            f"synthct {OLD_NAMES_UNTIL}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def _renamed(p: argparse.ArgumentParser, old: str, new: str, dest: str) -> None:
    p.add_argument(old, dest=dest, action=RenamedOption, new=new, help=argparse.SUPPRESS)


def _command(
    sub,
    name: str,
    summary: str,
    example: str,
    *,
    exits: str = "",
    required: tuple[str, ...] = (),
) -> argparse.ArgumentParser:
    """A subcommand whose help says what it does, shows an example and its exit codes.
    ``required``: options that must be given (checked after parsing, so an option's old name
    still satisfies it)."""
    p = sub.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog=f"example:\n  {example}\n\n{EXIT_TEXT}{exits}",
        formatter_class=HelpFormatter,
    )
    p.set_defaults(required_options=required, command_parser=p)
    return p


def _group(sub, name: str, summary: str) -> argparse._SubParsersAction:
    p = sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".")
    return p.add_subparsers(dest=f"{name}_command", required=True, metavar="SUBCOMMAND")


def _generator_option(p: argparse.ArgumentParser, what: str = "generator to sample") -> None:
    p.add_argument(
        "--generator",
        metavar="DIR|RUN|pretrained",
        help=f"{what}: a generator folder, a training run (its generator/), or 'pretrained' "
        "(the shipped phantom generator)",
    )
    _renamed(p, "--run", "--generator", "generator")


def _data_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--data", metavar="MANIFEST", help=f"real-data manifest CSV: {what}")


def _seed_option(p: argparse.ArgumentParser, default: int | None = 0, what: str = "") -> None:
    p.add_argument(
        "--seed",
        type=int,
        default=default,
        help="random seed" + (f" ({what})" if what else ""),
    )


def _device_option(
    p: argparse.ArgumentParser, default: str | None = "auto", what: str = ""
) -> None:
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=default,
        help="where the networks run"
        + (f", for {what}" if what else "")
        + "; auto takes CUDA when there is one"
        + ("" if default else " (default: the config's train.device)"),
    )


def _device(args: argparse.Namespace, *, federated: bool = False):
    """The torch device ``--device`` names (cuda without CUDA is refused); federated sites
    run on CPU in the simulation, so asking for cuda there is refused too."""
    from synthct.training import resolve_device

    if federated and args.device == "cuda":
        raise UsageError("--device cuda: federated sites train on CPU in the simulation")
    return resolve_device("cpu" if federated else args.device)


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
        help="classifier-free guidance scale for every class (default: the generator's own, "
        "per class where it has per-class scales)",
    )


def _plugin_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugins", metavar="REGISTRY", help="apply this plugin registry")
    p.add_argument(
        "--merge",
        choices=["fusion", "mixture"],
        default="fusion",
        help="how plugins combine: merged weights (fusion) or mixed predictions (mixture)",
    )
    p.add_argument(
        "--fit-weights",
        metavar="MANIFEST",
        help="fit the merge weights on this manifest's train cases (default: case counts)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synthct",
        description=__doc__,
        epilog="every command: synthct COMMAND --help\n\n" + EXIT_TEXT,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"synthct {__version__}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="library log level",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback behind an error message"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(
        sub,
        "demo",
        "end-to-end demo on the embedded phantom sites: train, generate, gate, downstream, plugin",
        "synthct demo --out runs/demo",
    )
    p.add_argument("--out", default="runs/demo", help="run folder")
    _config_options(p)
    _seed_option(p, None, "default: the config's seed")
    p.add_argument(
        "--from-scratch",
        action="store_true",
        help="train the generator from zero instead of fine-tuning the shipped one",
    )
    _device_option(p, "auto", "the cohort, the gate and the site plugin (federated stages: CPU)")
    p.set_defaults(func=cmd_demo)

    p = _command(
        sub,
        "train",
        "train the reference models and the generator (federated by default)",
        "synthct train --data sites/manifest.csv --out runs/gen --resume",
        required=("out",),
    )
    _config_options(p)
    _data_option(p, "its train split (default: make the config's phantom sites in OUT/data)")
    p.add_argument("--out", help="run folder (checkpoints, logs, generator/)")
    p.add_argument(
        "--central",
        action="store_true",
        help="pool all sites' train split instead of federated training (Flower simulation)",
    )
    p.add_argument(
        "--max-rounds",
        type=positive_int,
        default=None,
        help="federated: stop after this many rounds (continue with --resume)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument(
        "--budget-min", type=non_negative_float, default=None, help="wall-time budget in minutes"
    )
    _seed_option(p, None, "default: the config's seed")
    _device_option(p, None)
    p.set_defaults(func=cmd_train)

    p = _command(
        sub,
        "sample",
        "sample class-conditional volumes from a generator",
        "synthct sample --generator pretrained --label nodule --n 8 --out samples",
        required=("generator", "label", "out"),
    )
    _generator_option(p)
    p.add_argument("--label", help="class name from the generator's vocabulary")
    p.add_argument(
        "--site",
        default=None,
        help="render in this site's scanner style (site-conditioned generators; default: "
        "site-agnostic)",
    )
    p.add_argument("--n", type=positive_int, default=8, help="volumes to sample")
    p.add_argument("--out", help="folder for the volumes and their provenance JSON")
    _sampling_options(p)
    _seed_option(p)
    _device_option(p)
    _plugin_options(p)
    p.set_defaults(func=cmd_sample)

    p = _command(
        sub,
        "generate",
        "generate a class-balanced synthetic cohort for what the real data lacks",
        "synthct generate --generator pretrained --data sites/manifest.csv --per-site --out cohort",
        required=("generator", "data", "out"),
    )
    _generator_option(p)
    _data_option(p, "its train counts per class (and site) set the deficit")
    _renamed(p, "--reference", "--data", "data")
    p.add_argument(
        "--target",
        choices=["balanced"],
        default="balanced",
        help="what to fill up to: every class as common as the most common one",
    )
    p.add_argument("--counts", help="explicit targets instead: label=n,label=n")
    p.add_argument("--per-site", action="store_true", help="plan per site: each gets what it lacks")
    p.add_argument("--out", help="cohort folder (rerun the same command to resume)")
    _sampling_options(p)
    p.add_argument("--batch-size", type=positive_int, default=8, help="volumes per batch")
    p.add_argument(
        "--format",
        choices=["nifti", "dicom"],
        default="nifti",
        help="one .nii.gz per case, or one CT series folder per case marked synthetic",
    )
    _seed_option(p)
    _device_option(p)
    _plugin_options(p)
    p.set_defaults(func=cmd_generate)

    plug = _group(sub, "plugin", "site LoRA plugins: train, register, list")
    q = _command(
        plug,
        "train",
        "train a LoRA plugin on one site's data (the base generator stays frozen)",
        "synthct plugin train --generator pretrained --site site_e --data e/manifest.csv "
        "--out plugins/site_e",
        required=("generator", "site", "data", "out"),
    )
    _generator_option(q, "base generator")
    q.add_argument("--site", help="the site whose train cases the plugin learns")
    _data_option(q, "holds the site's train cases")
    q.add_argument("--out", help="plugin folder")
    q.add_argument("--rank", type=positive_int, default=None, help="LoRA rank (default: config)")
    q.add_argument(
        "--steps", type=positive_int, default=None, help="training steps (default: config)"
    )
    q.add_argument(
        "--targets",
        choices=["conv+linear", "attention+time"],
        default=None,
        help="which UNet layers get adapters (default: config)",
    )
    _seed_option(q)
    _device_option(q)
    q.set_defaults(func=cmd_plugin_train)
    q = _command(
        plug,
        "add",
        "validate a plugin (hashes, base generator, shapes) and add it to a registry folder",
        "synthct plugin add plugins/registry plugins/site_e --generator pretrained",
        required=("generator",),
    )
    q.add_argument("registry", help="registry folder (made if missing)")
    q.add_argument("plugin", help="plugin folder made by `synthct plugin train`")
    _generator_option(q, "the base generator the registry serves")
    q.set_defaults(func=cmd_plugin_add)
    q = _command(
        plug, "list", "list the plugins in a registry", "synthct plugin list plugins/registry"
    )
    q.add_argument("registry", help="registry folder")
    q.set_defaults(func=cmd_plugin_list)

    p = _command(
        sub,
        "gate",
        "score a cohort (fidelity, diversity, privacy, bias) against real data and judge it",
        "synthct gate --cohort cohort --data sites/manifest.csv",
        exits="\n  3  the cohort failed the gate",
        required=("cohort",),
    )
    p.add_argument("--cohort", help="cohort folder (with manifest.csv) or its manifest")
    _data_option(
        p,
        "its train and holdout splits (central), or the sites' rows each site reads (--federated)",
    )
    _renamed(p, "--manifest", "--data", "data")
    _renamed(p, "--train", "--data", "train_manifest")
    _renamed(p, "--holdout", "--data", "holdout_manifest")
    p.add_argument(
        "--federated",
        action="store_true",
        help="judge through Flower: each site scores the cohort on its own cases, sends aggregates",
    )
    p.add_argument("--rules", help="YAML overriding rule thresholds (see README)")
    p.add_argument(
        "--out",
        help="folder for gate.json (default: the cohort's folder, where downstream looks for it)",
    )
    _config_options(p, "the vocabulary, label maps and geometry")
    p.add_argument(
        "--reference-model",
        metavar="DIR",
        help="reference model folder (default: the shipped phantom one)",
    )
    _renamed(p, "--reference", "--reference-model", "reference_model")
    p.add_argument("--drop-flagged", metavar="DIR", help="also write the unflagged cases here")
    p.add_argument(
        "--sign",
        metavar="KEY",
        help="sign the verdict with this Ed25519 private key (made by `synthct keys`)",
    )
    _seed_option(p, 0, "bootstrap intervals")
    _device_option(p, "auto", "the reference encoder (central gate; federated sites use CPU)")
    p.set_defaults(func=cmd_gate)

    p = _command(
        sub,
        "reference",
        "train the frozen reference classifier/encoder the gate uses (central or federated)",
        "synthct reference --data sites/manifest.csv --out reference --federated",
        required=("data", "out"),
    )
    _data_option(p, "its train split trains, its holdout split reports")
    _renamed(p, "--manifest", "--data", "data")
    p.add_argument("--out", help="reference model folder")
    p.add_argument(
        "--federated", action="store_true", help="FedAvg over the sites (Flower simulation)"
    )
    _config_options(p)
    _seed_option(p)
    _device_option(p, "auto", "central training (federated sites train on CPU)")
    p.set_defaults(func=cmd_reference)

    p = _command(
        sub,
        "downstream",
        "train classifiers on real data, and on real + gated synthetic data, and compare",
        "synthct downstream --data sites/manifest.csv --cohort cohort --federated --out results",
        required=("data", "out"),
    )
    _data_option(p, "train (and holdout for early stopping) to learn, test to report")
    _renamed(p, "--real", "--data", "data")
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
    p.add_argument("--out", help="results folder")
    _config_options(p)
    p.add_argument("--seeds", help="comma-separated seeds (default: config downstream.seeds)")
    _device_option(p, "auto", "the central arms (federated sites train on CPU)")
    p.set_defaults(func=cmd_downstream)

    p = _command(
        sub,
        "phantoms",
        "write multi-site chest-CT phantoms (NIfTI) and their manifest.csv",
        "synthct phantoms --config demo --out sites",
        required=("out",),
    )
    _config_options(p)
    p.add_argument("--out", help="output folder")
    _seed_option(p, None, "default: the config's seed")
    p.set_defaults(func=cmd_phantoms)

    data_sub = _group(sub, "data", "data utilities")
    q = _command(
        data_sub,
        "check",
        "validate a manifest and its volumes, reporting every problem at once",
        "synthct data check sites/manifest.csv --config demo",
    )
    q.add_argument("manifest", help="manifest CSV")
    _config_options(q, "the vocabulary, label maps and geometry")
    q.set_defaults(func=cmd_data_check)

    audit_sub = _group(sub, "audit", "site audit logs")
    q = _command(
        audit_sub,
        "verify",
        "check audit logs' hash chains; names the first edited record",
        "synthct audit verify runs/gen/sites --rounds runs/gen/rounds.jsonl",
    )
    q.add_argument("paths", nargs="+", help="audit.jsonl files or folders holding them")
    q.add_argument(
        "--rounds",
        metavar="ROUNDS_JSONL",
        help="the server's round log: every audit head a site reported must be in its log",
    )
    q.set_defaults(func=cmd_audit_verify)

    p = _command(
        sub,
        "export-bundle",
        "write a generator as a MONAI bundle (metadata, inference config, hashed weights)",
        "synthct export-bundle --generator runs/gen --out bundles/gen",
        required=("generator", "out"),
    )
    _generator_option(p)
    p.add_argument("--out", help="new (or empty) folder for the bundle")
    p.set_defaults(func=cmd_export_bundle)

    p = _command(
        sub,
        "keys",
        "make an Ed25519 key pair for signing gate verdicts",
        "synthct keys keys --name hospital_gate",
    )
    p.add_argument("dir", help="folder for NAME.key (private, 0600) and NAME.pub")
    p.add_argument("--name", default="gate", help="key file name")
    p.set_defaults(func=cmd_keys)

    cfg_sub = _group(sub, "config", "show or validate a config")
    q = _command(
        cfg_sub,
        "show",
        "print the whole validated config, defaults filled in, as YAML",
        "synthct config show --config demo --set train.batch_size=2",
    )
    _config_options(q)
    q.set_defaults(func=cmd_config_show)
    q = _command(
        cfg_sub,
        "memory",
        "estimate the accelerator memory each phase of a config needs (nothing allocated)",
        "synthct config memory --config chest128",
    )
    _config_options(q)
    q.add_argument(
        "--batch-size", type=int, default=None, help="batch (default: the config's batches)"
    )
    q.set_defaults(func=cmd_config_memory)
    q = _command(
        cfg_sub,
        "validate",
        "check a config (and --set overrides)",
        "synthct config validate my.yaml",
    )
    q.add_argument("config", metavar="YAML|NAME", help="a YAML path or a packaged name")
    q.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value (repeatable)",
    )
    q.set_defaults(func=cmd_config_validate)

    fed = _group(sub, "fed", "multi-machine Flower deployment helpers")
    q = _command(
        fed,
        "app",
        "write the code-free Flower app directory for `flwr run` (one app for the generator, "
        "reference and gate tasks: --run-config \"task='gate' cohort=... reference=...\")",
        "synthct fed app flower_app --config demo --out runs/federated",
    )
    q.add_argument("dir", help="folder for the Flower app")
    q.add_argument("--config", default="demo", help="YAML path on the SuperLink machine or name")
    q.add_argument("--out", default="runs/federated", help="run folder on the SuperLink machine")
    q.set_defaults(func=cmd_fed_app)
    q = _command(
        fed,
        "certs",
        "make a private CA and the SuperLink's TLS certificate",
        "synthct fed certs certs --host superlink.example.org",
    )
    q.add_argument("dir", help="folder for the CA and certificate files")
    q.add_argument("--host", action="append", help="SuperLink host name or IP (repeatable)")
    q.set_defaults(func=cmd_fed_certs)
    q = _command(
        fed,
        "keys",
        "make a SuperNode authentication key pair for one site",
        "synthct fed keys keys --site site_a",
        required=("site",),
    )
    q.add_argument("dir", help="folder for the key pair")
    q.add_argument("--site", help="the site's name")
    q.set_defaults(func=cmd_fed_keys)
    return parser


def _check_required(args: argparse.Namespace) -> None:
    """Options a command needs, checked after parsing so an old option name counts too."""
    missing = [
        "--" + dest.replace("_", "-")
        for dest in getattr(args, "required_options", ())
        if getattr(args, dest, None) is None
    ]
    if missing:
        args.command_parser.error("the following arguments are required: " + ", ".join(missing))


def _check_out(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` of the wrong kind before any work (a folder where a file is written,
    or a file where a folder is), so no result is computed only to be lost."""

    out = getattr(args, "out", None)
    if out is None:
        return
    path = Path(out)
    if args.func is cmd_gate and out.endswith(".json"):
        print(
            f"synthct: notice: --out {out}: a report file name is the old form; --out now names "
            f"a folder (gate.json is written in it), the old form works until synthct "
            f"{OLD_NAMES_UNTIL}",
            file=sys.stderr,
        )
        if path.is_dir():
            raise UsageError(f"--out {out}: is a folder; give a folder for gate.json, e.g. {out}")
    elif path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")


def _check_inputs(args: argparse.Namespace) -> None:
    """Input paths named on the command line exist and are of the right kind, checked before a
    command imports torch, so a mistyped path is answered at once (with the message the
    loaders give)."""
    from synthct.data.manifest import require_manifest_file

    data = getattr(args, "data", None)
    if data:
        require_manifest_file(Path(data))
    generator = getattr(args, "generator", None)
    if generator and generator != "pretrained":
        record = _generator_dir(generator) / "config.json"
        if not record.is_file():
            raise UsageError(f"{record}: no generator here (config.json missing)")
    if args.func is cmd_plugin_list and not Path(args.registry).is_dir():
        raise UsageError(f"{args.registry}: no plugin registry there (not a folder)")


def main(argv: list[str] | None = None) -> int:
    from synthct.errors import SynthctError  # light: --help and argument errors stay fast

    parser = build_parser()
    args = parser.parse_args(argv)
    _check_required(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_out(args)
        _check_inputs(args)
        return int(args.func(args))
    except SynthctError as exc:
        if args.debug:
            raise
        print(f"synthct: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("synthct: interrupted; completed work is kept on disk", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
