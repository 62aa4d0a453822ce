"""A hospital that joins late: a LoRA plugin vs federated retraining, on its own holdout.

    python bench/plugins.py [--budget-min 60] [--steps 300] [--per-class 8] [--out runs/bench_plugins]

The base is the shipped pretrained phantom generator (trained federatedly on the demo's four
sites). A fifth site, ``site_e``, never seen by it, has its own scanner style (noisier, +30 HU,
5 mm blur) and many rare-class cases. It contributes a plugin (peft LoRA on the frozen EMA
UNet, trained on its ``train`` split only); ``site_b`` (no rare class) contributes a second
one so that Mixture has something to route. Compared on ``site_e``'s holdout:

- ``base``: the shipped generator as is;
- ``fusion``: both plugins' deltas merged into the UNet (case-count weights);
- ``mixture``: the plugins kept apart, their predictions mixed per requested class;
- ``fusion_fitted`` / ``mixture_fitted``: the same, with merge weights fitted on a small
  validation set (2 ``train`` cases per class per site, all five sites) instead of case counts;
- ``sweep_*`` (``--sweep``): ``site_e``'s plugin alone at rank 2/4/8 on conv+linear or on
  attention+time-embedding layers only (quality vs size);
- ``*_decoder``: the same merges with ``site_e``'s plugin carrying a decoder adapter too
  (``--decoder-rank``, ``--decoder-steps``: its scanner style, where the decoder renders it),
  sampled as cases made for ``site_e`` (so its adapted decoder renders them);
  ``decoder_only_site_e``: the base UNet with only that plugin's decoder adapter (the style
  without the UNet adapter's change of anatomy);
- ``retrain``: federated fine-tuning instead (Flower simulation, all five sites): as many
  decoder rounds as the decoder adapter's steps take (``--decoder-steps`` over the config's
  local decoder steps), then the config's ``finetune_rounds`` diffusion rounds — what
  synchronous rounds would do instead. The base is class-only with a site-agnostic decoder, so
  its cases are sampled site-agnostic: the retrained decoder renders the five sites' mix.

``--seed`` sets the plugins' training, the retraining and the sampling seed (run it for
several seeds; each seed keeps its plugins and retraining under ``OUT/seed_<seed>``, so one
``--out`` serves every seed; the phantoms are the same for all). The retraining arm is skipped
with ``--budget-min 0``; ``--results`` also writes the result file there.

Reported per arm: bytes a site sends (plugin file vs a full UNet update), conditional accuracy
(shipped reference classifier), class-matched KID of HU/texture (radiomics) features against
``site_e``'s holdout and against the other sites' holdout, and sampling wall time (Mixture
runs the adapted UNet once per plugin that covers a row). Results: ``OUT/seed_<seed>/plugins.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from phantom_world import bench_command

from synthct.artifacts import write_json
from synthct.checkpoint import load_generator
from synthct.config import config_from_dict, load_config, packaged_config_path
from synthct.data.dataset import load_cases
from synthct.data.phantoms import write_phantom_sites
from synthct.data.preprocess import hu_to_model, model_to_hu
from synthct.eval.distribution import class_matched_kid
from synthct.eval.features import radiomics_features
from synthct.fed.payload import tensors_to_bytes
from synthct.fed.simulation import train_federated
from synthct.plugins.adapter import export_plugin, train_site_adapters
from synthct.plugins.fit import fit_fusion_weights, fit_mixture_weights, validation_draws
from synthct.plugins.merge import MixtureDenoiser, fuse, with_site_decoders
from synthct.plugins.registry import add_plugin, load_plugins
from synthct.pretrained import load_phantom_reference, phantom_dir
from synthct.reference import evaluate_classifier
from synthct.sampling import sample_volumes

LATE_SITE = {
    "name": "site_e",
    "counts": {"normal": 20, "nodule": 10, "ground_glass": 10, "consolidation": 12},
    "noise_hu": 30,
    "hu_offset": 30,
    "blur_mm": 5,
    "slice_mm": 10,
    "fov_mm": 370,
}


def kid_against(
    syn_hu: torch.Tensor,
    syn_labels: np.ndarray,
    real_hu: torch.Tensor,
    real_labels: np.ndarray,
    scale: np.ndarray,
) -> float:
    """Class-matched KID on radiomics features (the gate's fidelity metric), every set
    standardised by the same ``scale`` rows (all sites' holdout)."""
    syn = radiomics_features(syn_hu)
    return class_matched_kid(syn, syn_labels, radiomics_features(real_hu), real_labels, scale)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/bench_plugins")
    parser.add_argument("--budget-min", type=float, default=60.0, help="skip retraining past it")
    parser.add_argument("--steps", type=int, default=None, help="plugin steps (default: config)")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="also: site_e plugins at rank 2/4/8 on conv+linear and attention+time, fused alone",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decoder-rank", type=int, default=4)
    parser.add_argument("--decoder-steps", type=int, default=300)
    parser.add_argument("--results", default=None, help="also write the result file here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    start = time.perf_counter()
    out = Path(args.out)
    runs = out / f"seed_{args.seed}"  # what the seed trains; the phantoms are shared
    base_config = load_config(packaged_config_path("demo"))
    document = base_config.model_dump(mode="json")
    document["data"]["sites"].append(LATE_SITE)
    document["plugins"]["late_site"] = None  # site_e is one of this world's sites here
    config = config_from_dict(document, source="demo.yaml + site_e")
    manifest = out / "data" / "manifest.csv"
    if not manifest.is_file():
        write_phantom_sites(config, out / "data")
    gen_dir = phantom_dir() / "generator"
    gen = load_generator(gen_dir)
    reference = load_phantom_reference(config.labels.vocabulary_hash)
    window = config.data.hu_window
    classes = list(config.labels.classes)
    holdout_e = load_cases(manifest, config, splits=("holdout",), sites=("site_e",))
    others = [s for s in config.site_names if s != "site_e"]
    holdout_o = load_cases(manifest, config, splits=("holdout",), sites=tuple(others))

    def train_and_export(site: str, cases, cfg, plugin_dir: Path) -> float:
        """Train ``site``'s plugin (its decoder adapter too with ``cfg.decoder_rank``) and
        export it to ``plugin_dir``; seconds of training."""
        t0 = time.perf_counter()
        unet, decoder = train_site_adapters(gen, cases, cfg, seed=args.seed)
        train_s = round(time.perf_counter() - t0, 1)
        export_plugin(
            unet,
            plugin_dir,
            gen=gen,
            generator_dir=gen_dir,
            site=site,
            cases=cases,
            cfg=cfg,
            decoder=decoder,
        )
        return train_s

    # --- plugins (site_e: the late site; site_b: a second contributor without the rare class)
    registry = runs / "registry"
    plugin_s: dict[str, float] = {}
    if not registry.is_dir():
        for site in ("site_e", "site_b"):
            cases = load_cases(manifest, config, splits=("train",), sites=(site,))
            cfg = gen.config.plugins.model_copy(update={"steps": args.steps} if args.steps else {})
            plugin_s[site] = train_and_export(site, cases, cfg, runs / "plugins" / site)
            add_plugin(registry, runs / "plugins" / site, gen, gen_dir)
    plugins = load_plugins(registry, gen, gen_dir)
    plugin_bytes = {p.meta["site"]: int(p.meta["weights_bytes"]) for p in plugins}
    unet_bytes = len(tensors_to_bytes({k: v for k, v in gen.ema.state_dict().items()}))

    # --- arms
    arms: dict[str, dict] = {}
    labels = torch.arange(len(classes)).repeat_interleave(args.per_class)

    hu_e = model_to_hu(holdout_e.images, window)
    hu_o = model_to_hu(holdout_o.images, window)
    y_e, y_o, syn_y = holdout_e.labels.numpy(), holdout_o.labels.numpy(), labels.numpy()
    scale = radiomics_features(torch.cat([hu_e, hu_o]))

    def score(
        name: str, g, denoiser=None, sent_bytes: int | None = None, extra=None, sites=None
    ) -> None:
        t0 = time.perf_counter()
        hu = sample_volumes(
            g,
            labels,
            generator=torch.Generator().manual_seed(args.seed),
            denoiser=denoiser,
            sites=sites,
        )
        wall = time.perf_counter() - t0
        acc = evaluate_classifier(reference.predict(hu_to_model(hu, window)), labels, len(classes))
        arms[name] = {
            "bytes_sent_per_site": sent_bytes,
            "conditional_accuracy": round(acc["balanced_accuracy"], 3),
            "conditional_per_class": {
                classes[c]: round(v, 3) for c, v in acc["per_class_recall"].items()
            },
            "kid_radiomics_site_e": round(kid_against(hu, syn_y, hu_e, y_e, scale), 3),
            "kid_radiomics_other_sites": round(kid_against(hu, syn_y, hu_o, y_o, scale), 3),
            "sampling_s": round(wall, 1),
            **(extra or {}),
        }
        if denoiser is not None:
            arms[name]["unet_calls"] = denoiser.calls
        print(name, json.dumps(arms[name]), flush=True)

    score("base", gen, sent_bytes=0)
    e_only = [p for p in plugins if p.meta["site"] == "site_e"]
    score("fusion", fuse(gen, plugins), sent_bytes=max(plugin_bytes.values()))
    score("fusion_site_e_only", fuse(gen, e_only), sent_bytes=plugin_bytes["site_e"])
    score(
        "mixture",
        gen,
        denoiser=MixtureDenoiser(gen, plugins),
        sent_bytes=max(plugin_bytes.values()),
    )
    # --- merge weights fitted on a small validation set (2 train cases per class per site)
    train_all = load_cases(manifest, config, splits=("train",))
    picks: dict[tuple[str, int], list[int]] = {}
    for i, (site, label) in enumerate(zip(train_all.sites, train_all.labels.tolist(), strict=True)):
        picks.setdefault((site, label), []).append(i)
    validation = train_all.subset(sorted(i for rows in picks.values() for i in rows[:2]))
    draws = validation_draws(gen, validation)
    fits: dict[str, dict] = {}
    t0 = time.perf_counter()
    fit = fit_fusion_weights(gen, plugins, draws)
    fits["fusion"] = fit.summary() | {"fit_s": round(time.perf_counter() - t0, 1)}
    score(
        "fusion_fitted",
        fuse(gen, plugins, fit.weights.tolist()),
        sent_bytes=max(plugin_bytes.values()),
    )
    t0 = time.perf_counter()
    fit = fit_mixture_weights(gen, plugins, draws)
    fits["mixture"] = fit.summary() | {
        "fit_s": round(time.perf_counter() - t0, 1),
        "per_class_loss": fit.per_class,
    }
    score(
        "mixture_fitted",
        gen,
        denoiser=MixtureDenoiser(gen, plugins, fit.weights),
        sent_bytes=max(plugin_bytes.values()),
    )
    print("fits", json.dumps({"validation_cases": len(validation), **fits}), flush=True)

    # --- site_e's plugin with a decoder adapter: its scanner style, on the decoder
    registry_decoder = runs / "registry_decoder"
    if not registry_decoder.is_dir():
        cases = load_cases(manifest, config, splits=("train",), sites=("site_e",))
        cfg = gen.config.plugins.model_copy(
            update={"decoder_rank": args.decoder_rank, "decoder_steps": args.decoder_steps}
            | ({"steps": args.steps} if args.steps else {})
        )
        plugin_s["site_e_decoder"] = train_and_export(
            "site_e", cases, cfg, runs / "plugins" / "site_e_decoder"
        )
        add_plugin(registry_decoder, runs / "plugins" / "site_e_decoder", gen, gen_dir)
        add_plugin(registry_decoder, runs / "plugins" / "site_b", gen, gen_dir)
    with_decoder = load_plugins(registry_decoder, gen, gen_dir)
    e_decoder = [p for p in with_decoder if p.meta["site"] == "site_e"]
    plugin_bytes["site_e_decoder"] = int(e_decoder[0].meta["weights_bytes"])
    for_e = ["site_e"] * len(labels)
    score("base_for_site_e", gen, sent_bytes=0, sites=for_e)
    score(  # the style alone: the base UNet, site_e's decoder adapter (its UNet adapter unused)
        "decoder_only_site_e",
        with_site_decoders(gen, e_decoder),
        sent_bytes=plugin_bytes["site_e_decoder"],
        sites=for_e,
    )
    score(
        "fusion_site_e_only_decoder",
        fuse(gen, e_decoder),
        sent_bytes=plugin_bytes["site_e_decoder"],
        sites=for_e,
    )
    score(
        "fusion_decoder",
        fuse(gen, with_decoder),
        sent_bytes=plugin_bytes["site_e_decoder"],
        sites=for_e,
    )
    score(
        "mixture_decoder",
        with_site_decoders(gen, with_decoder),
        denoiser=MixtureDenoiser(gen, with_decoder),
        sent_bytes=plugin_bytes["site_e_decoder"],
        sites=for_e,
    )

    sweep: dict[str, dict] = {}
    if args.sweep:  # quality vs size: rank x targets, each site_e plugin fused on its own
        cases_e = load_cases(manifest, config, splits=("train",), sites=("site_e",))
        for targets in ("conv+linear", "attention+time"):
            for rank in (2, 4, 8):
                name = f"sweep_{targets}_r{rank}"
                cfg = gen.config.plugins.model_copy(
                    update={"rank": rank, "alpha": float(rank), "targets": targets}
                    | ({"steps": args.steps} if args.steps else {})
                )
                plugin_dir = runs / "sweep" / name
                train_s = None  # cached from an earlier run
                if not (plugin_dir / "plugin.json").is_file():
                    train_s = train_and_export("site_e", cases_e, cfg, plugin_dir)
                sweep_registry = runs / "sweep" / f"registry_{name}"
                if not sweep_registry.is_dir():
                    add_plugin(sweep_registry, plugin_dir, gen, gen_dir)
                plugin = load_plugins(sweep_registry, gen, gen_dir)
                size = int(plugin[0].meta["weights_bytes"])
                score(
                    name,
                    fuse(gen, plugin),
                    sent_bytes=size,
                    extra={"share_of_unet": round(size / unet_bytes, 4), "train_s": train_s},
                )
                sweep[name] = arms.pop(name)
    decoder_bytes = len(
        tensors_to_bytes({k: v for k, v in gen.autoencoder.decoder.state_dict().items()})
    )
    elapsed_min = (time.perf_counter() - start) / 60
    if elapsed_min < args.budget_min:
        # the decoder sees as many local steps per site as the plugin's decoder adapter
        decoder_rounds = math.ceil(args.decoder_steps / config.federated.local_steps_decoder)
        fed = config.federated.finetune_schedule().model_copy(
            update={"decoder_rounds": decoder_rounds}
        )
        run = runs / "retrain"
        t0 = time.perf_counter()
        retrained = train_federated(
            config.model_copy(update={"federated": fed, "seed": args.seed}),
            manifest,
            run,
            resume=(run / "fed_state.json").is_file(),
            initial=gen_dir,
        )
        score(
            "retrain",
            retrained,
            sent_bytes=unet_bytes * fed.diffusion_rounds + decoder_bytes * decoder_rounds,
            extra={
                "train_s": round(time.perf_counter() - t0, 1),
                "rounds": fed.diffusion_rounds,
                "decoder_rounds": decoder_rounds,
            },
        )
    else:
        print(f"retraining skipped: {elapsed_min:.1f} min used of --budget-min {args.budget_min}")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "command": bench_command("plugins.py", args),
        "late_site": LATE_SITE,
        "unet_update_bytes": unet_bytes,
        "generator_update_bytes": unet_bytes + decoder_bytes,
        "plugin_bytes": plugin_bytes,
        "plugin_train_s": plugin_s,
        "per_class": args.per_class,
        "arms": arms,
        "sweep": sweep,
        "fitted_weights": {"validation_cases": len(validation), "draws": len(draws), **fits},
        "wall_s": round(time.perf_counter() - start, 1),
    }
    write_json(runs / "plugins.json", result, kind="bench-plugins")
    if args.results:
        write_json(args.results, result, kind="bench-plugins")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
