"""A generator whose UNet comes from one folder and whose autoencoder (decoder) from another,
for benches that ask what a decoder adds under a given UNet (issues 20 and 26).

    python bench/combine_generator.py --unet DIR --autoencoder DIR --out DIR
        [--class-guidance bench/results/class_guidance_<date>.json]

Both folders must share the encoder exactly (same weights: the UNet learnt that encoder's
latents), which is checked tensor by tensor; the result takes the UNet folder's UNet, latent
normalisation, diffusion and sampling settings and the other folder's whole autoencoder with
its ``autoencoder`` config section (a site-styled decoder keeps its site table). With
``--class-guidance`` it samples with the per-class scales ``bench/class_guidance.py`` chose on
holdout for it (its ``chosen_on_A``). It is saved sampling-only, with both sources and their
sha256 recorded in ``config.json``.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch
from phantom_world import bench_command

from synthct.artifacts import read_json
from synthct.checkpoint import generator_sha256, load_generator, save_generator


def encoder_state(autoencoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that make latents: everything but the decoder and its site style."""
    return {
        k: v
        for k, v in autoencoder.state_dict().items()
        if not k.startswith(("decoder.", "post_quant_conv.", "site_style."))
    }


def same_encoder(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of the encoder tensors that differ (empty: the latents are the same)."""
    ea, eb = encoder_state(a), encoder_state(b)
    if set(ea) != set(eb):
        return sorted(set(ea) ^ set(eb))
    return [k for k in ea if not torch.equal(ea[k], eb[k])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unet", required=True, help="generator folder that gives the UNet")
    p.add_argument("--autoencoder", required=True, help="generator folder that gives the decoder")
    p.add_argument("--class-guidance", default=None, help="class_guidance.py results to take")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    with_unet, with_ae = load_generator(args.unet), load_generator(args.autoencoder)
    differ = same_encoder(with_unet.autoencoder, with_ae.autoencoder)
    if differ:
        raise SystemExit(
            f"{args.unet} and {args.autoencoder} do not share the encoder "
            f"({len(differ)} tensors differ, e.g. {differ[:3]}): its latents would not fit"
        )
    config = with_unet.config.model_copy(update={"autoencoder": with_ae.config.autoencoder})
    if args.class_guidance:
        chosen = read_json(args.class_guidance)["chosen_on_A"]
        scales = {name: row["guidance"] for name, row in chosen.items()}
        sampling = config.sampling.model_copy(update={"class_guidance": scales})
        config = config.model_copy(update={"sampling": sampling})
    combined = dataclasses.replace(with_unet, config=config, autoencoder=with_ae.autoencoder)
    extra = {
        "combined_from": {
            "unet": {"folder": args.unet, "sha256": generator_sha256(args.unet)},
            "autoencoder": {
                "folder": args.autoencoder,
                "sha256": generator_sha256(args.autoencoder),
            },
            "command": bench_command("combine_generator.py", args),
        }
    }
    out = save_generator(combined, args.out, extra=extra, sampling_only=True)
    print(f"generator: {out} (sha256 {generator_sha256(out)})")


if __name__ == "__main__":
    main()
