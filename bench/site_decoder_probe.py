"""Probe: how far do a site-styled decoder and a patch-adversarial term lift the autoencoder's
ceiling, decoder-only, from the shipped generator?

    python bench/site_decoder_probe.py [--steps 600] [--arms plain site site+adv0.01 ...]
        [--lr 1e-4] [--results bench/results/site_decoder_probe_<date>.txt] [--save]

The shipped autoencoder's encoder is frozen (its latents, and any UNet trained on them, stay
valid); its decoder is refined for STEPS decoder-only steps of the product's decoder phase
(``synthct.training.decoder_step``: L1 + edge + lung-window detail, + the adversarial term)
from the same start in each arm: ``plain`` (no site), ``site`` (``autoencoder.site_style``),
``site+advW`` (site style and ``adversarial_weight`` W, MONAI PatchDiscriminator), ``site+wide``
(a fresh decoder twice as wide with two residual blocks per level, on the same frozen latents:
is the decoder's capacity the ceiling? Not savable: the product's config has one width). A fresh real
cohort (seed 4242, each case for its own site) is reconstructed by each arm, for its site, and
gated, as in bench/autoencoder_ceiling.py. ``--save`` keeps each arm's refined generator (its
shipped UNet unchanged) as ``OUT/ARM/generator`` for bench/cohort_gate.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from phantom_world import phantom_manifest

from synthct.adoption import adopt_generator
from synthct.checkpoint import load_generator, save_generator
from synthct.config import load_config, packaged_config_path
from synthct.data.dataset import load_cases
from synthct.data.manifest import read_manifest, write_manifest
from synthct.data.preprocess import model_to_hu
from synthct.data.volume_io import write_nifti
from synthct.eval import negatives
from synthct.eval.gate import load_real, run_gate
from synthct.pretrained import load_phantom_reference, phantom_dir
from synthct.sampling import reconstruct
from synthct.training import (
    BalancedSampler,
    LatentDecoder,
    decoder_step,
    detail_range,
    encode_latents,
)


def widen_decoder(gen) -> None:
    """Replace the generator's decoder (and its site style's feature bias) by a fresh one with
    twice the channels and two residual blocks per level; the encoder is left as it is."""
    from monai.networks.nets.autoencoderkl import Decoder

    from synthct.models.autoencoder import SiteStyle

    ae, cfg = gen.autoencoder, gen.config.autoencoder
    channels = tuple(2 * c for c in cfg.channels)
    ae.decoder = Decoder(
        spatial_dims=3,
        channels=channels,
        in_channels=cfg.latent_channels,
        out_channels=1,
        num_res_blocks=(2,) * len(channels),
        norm_num_groups=cfg.norm_num_groups,
        norm_eps=1e-6,
        attention_levels=(False,) * len(channels),
        with_nonlocal_attn=False,
        include_fc=False,
    )
    ae.site_style = SiteStyle(gen.config.site_names, cfg.spare_site_slots, channels[-1])


def arm_config(config, arm: str):
    """The demo config with this arm's decoder settings."""
    weight = float(arm.split("adv", 1)[1].split("+")[0]) if "adv" in arm else 0.0
    ae = config.autoencoder.model_copy(
        update={"site_style": arm != "plain", "adversarial_weight": weight}
    )
    return config.model_copy(update={"autoencoder": ae})


def refine(gen, train, steps: int, lr: float, seed: int = 0) -> dict:
    """``steps`` decoder-phase steps on the pooled train cases; wall time and last losses."""
    cfg = gen.config.autoencoder
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    decoder = LatentDecoder(gen.autoencoder, gen.discriminator)
    opt = torch.optim.AdamW(decoder.parameters(), lr=lr)
    z = encode_latents(gen.autoencoder, train.images)
    detail = detail_range(cfg, gen.config.data.hu_window)
    sampler = BalancedSampler(train.labels, balanced=True, generator=g)
    start, parts = time.perf_counter(), {}
    for _ in range(steps):
        idx = sampler(gen.config.train.batch_size)
        rows = decoder.site_rows(
            [train.sites[i] for i in idx.tolist()], dropout=cfg.site_style_dropout, generator=g
        )
        parts = decoder_step(
            decoder, opt, z[idx], train.images[idx], cfg, sites=rows, detail=detail
        )
    return {"wall_s": round(time.perf_counter() - start, 1), "last": parts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--arms", nargs="+", default=["plain", "site", "site+adv0.01", "site+adv0.05"])
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", default="runs/bench_site_decoder")
    p.add_argument("--results", default=None)
    p.add_argument("--save", action="store_true", help="keep each arm's refined generator")
    args = p.parse_args()
    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = load_config(packaged_config_path("demo"))
    manifest = phantom_manifest(config, out)
    train = load_cases(manifest, config, splits=("train",))
    reference = load_phantom_reference(config.labels.vocabulary_hash)
    real = load_real(manifest, manifest, config=config, reference=reference)
    counts = {"nodule": 20, "ground_glass": 20, "consolidation": 30}
    fresh = negatives.fresh_real_cohort(config, counts, out / "fresh", seed=4242)
    rows = read_manifest(fresh)
    fresh_cases = load_cases(fresh, config, splits=("train",))
    lines = [
        f"# {time.strftime('%Y-%m-%d')}: python bench/site_decoder_probe.py --steps {args.steps} "
        f"--lr {args.lr} --arms {' '.join(args.arms)}",
        "# shipped autoencoder, encoder frozen; fresh real cohort seed 4242 (70 cases), each "
        "case reconstructed for its own site; arm, wall_s, verdict, failed rules, values",
    ]
    for arm in args.arms:
        gen = adopt_generator(load_generator(phantom_dir() / "generator"), arm_config(config, arm))
        if arm.endswith("+wide"):
            widen_decoder(gen)
        info = refine(gen, train, args.steps, args.lr)
        with torch.no_grad():
            recon = model_to_hu(
                reconstruct(gen, fresh_cases.images, sites=fresh_cases.sites),
                config.data.hu_window,
            )
        d = out / arm
        if args.save and not arm.endswith("+wide"):
            save_generator(gen, d / "generator", sampling_only=True, extra={"probe": info})
        for row, v in zip(rows, recon, strict=True):
            write_nifti(d / row.path, v[0].numpy(), config.data.spacing_mm)
        write_manifest(d / "manifest.csv", rows)
        rep = run_gate(d / "manifest.csv", real, config=config, reference=reference)
        values = {r["rule"]: r["value"] for r in rep["rules"]}
        line = (
            f"{arm} {info['wall_s']} {rep['verdict']} {rep['failed_rules']} {json.dumps(values)} "
            f"last_losses={json.dumps({k: round(v, 4) for k, v in info['last'].items()})}"
        )
        print(line, flush=True)
        lines.append(line)
    if args.results:
        Path(args.results).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
