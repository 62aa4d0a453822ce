"""Probe: does a site-conditioned decoder lift the autoencoder's ceiling over the same decoder
refined without the site?

    python bench/site_decoder_probe.py [STEPS]

The shipped autoencoder's encoder is frozen (its latents, and any UNet trained on them, stay
valid); its decoder is refined for STEPS decoder-only steps (L1 + edge + lung-window detail, as
the decoder phase trains) twice from the same start: plain, and with a learnt per-site bias on
the first decoder block's features plus a per-site output scale and shift. A fresh real cohort
(seed 4242, each case for its own site) is reconstructed by each and gated, as in
bench/autoencoder_ceiling.py. Not a product component yet: the question it answers is where
the scanner style should live.
"""

import copy
import json
import sys
import time
from pathlib import Path

import torch
from phantom_world import phantom_manifest
from torch import nn

from synthct.checkpoint import load_generator
from synthct.config import load_config, packaged_config_path
from synthct.data.dataset import load_cases
from synthct.data.manifest import read_manifest, write_manifest
from synthct.data.preprocess import model_to_hu
from synthct.data.volume_io import write_nifti
from synthct.eval import negatives
from synthct.eval.gate import load_real, run_gate
from synthct.pretrained import load_phantom_reference, phantom_dir
from synthct.training import BalancedSampler, detail_range, reconstruction_loss

torch.set_num_threads(2)
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 600
out = Path("runs/bench_site_decoder")
out.mkdir(parents=True, exist_ok=True)
config = load_config(packaged_config_path("demo"))
manifest = phantom_manifest(config, out)
gen = load_generator(phantom_dir() / "generator")
sites = config.site_names


class SiteDecoder(nn.Module):
    def __init__(self, ae, n_sites, use_site):
        super().__init__()
        self.pq, self.dec = copy.deepcopy(ae.post_quant_conv), copy.deepcopy(ae.decoder)
        with torch.no_grad():  # channels of the first decoder block's output
            c = self.dec.blocks[0](
                torch.zeros(1, config.autoencoder.latent_channels, 4, 4, 4)
            ).shape[1]
        self.bias = nn.Embedding(n_sites + 1, c)
        nn.init.zeros_(self.bias.weight)
        self.out = nn.Embedding(n_sites + 1, 2)
        nn.init.zeros_(self.out.weight)
        self.use_site = use_site

    def forward(self, z, s):
        h = self.dec.blocks[0](self.pq(z))
        if self.use_site:
            h = h + self.bias(s)[:, :, None, None, None]
        for b in self.dec.blocks[1:]:
            h = b(h)
        if self.use_site:
            a = self.out(s)
            h = h * (1 + a[:, :1, None, None, None]) + a[:, 1:, None, None, None]
        return h


train = load_cases(manifest, config, splits=("train",))
s_idx = torch.tensor([sites.index(s) for s in train.sites])
with torch.no_grad():
    z = torch.cat(
        [gen.autoencoder.encode(train.images[i : i + 16])[0] for i in range(0, len(train), 16)]
    )
detail = detail_range(config.autoencoder, config.data.hu_window)
reference = load_phantom_reference(config.labels.vocabulary_hash)
real = load_real(manifest, manifest, config=config, reference=reference)
fresh = negatives.fresh_real_cohort(
    config, {"nodule": 20, "ground_glass": 20, "consolidation": 30}, out / "fresh", seed=4242
)
rows = read_manifest(fresh)
fc = load_cases(fresh, config, splits=("train",))
fs = torch.tensor([sites.index(s) for s in fc.sites])
with torch.no_grad():
    fz = gen.autoencoder.encode(fc.images)[0]
results = {}
for name, use_site in (("plain", False), ("site", True)):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = SiteDecoder(gen.autoencoder, len(sites), use_site)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    sampler = BalancedSampler(s_idx, balanced=True, generator=g)
    t = time.time()
    for _ in range(steps):
        idx = sampler(4)
        loss, _parts = reconstruction_loss(
            model(z[idx], s_idx[idx]), train.images[idx], config.autoencoder, detail
        )
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    with torch.no_grad():
        rec = model_to_hu(model(fz, fs), config.data.hu_window)
    d = out / name
    for row, v in zip(rows, rec, strict=True):
        write_nifti(d / row.path, v[0].numpy(), config.data.spacing_mm)
    write_manifest(d / "manifest.csv", rows)
    rep = run_gate(d / "manifest.csv", real, config=config, reference=reference)
    results[name] = {r["rule"]: r["value"] for r in rep["rules"]}
    print(
        name,
        round(time.time() - t),
        rep["verdict"],
        rep["failed_rules"],
        json.dumps(results[name]),
        flush=True,
    )
