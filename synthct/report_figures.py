"""The report's pictures, each a PNG data URI: volume montages, per-site style pairs, HU
histograms, training curves and per-site downstream bars (matplotlib, headless)."""

from __future__ import annotations

import base64
import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = [
    "png_uri",
    "montage",
    "site_pairs",
    "hu_histograms",
    "training_curves",
    "downstream_bars",
]


def png_uri(fig) -> str:
    """The figure as an embeddable PNG data URI (and closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def montage(volumes: np.ndarray, title: str, window: tuple[float, float] = (-1000, 400)) -> str:
    """Rows = volumes, columns = axial / coronal / sagittal central slices (HU, lung-ish window)."""
    n = len(volumes)
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n), squeeze=False)
    for i, vol in enumerate(volumes):
        x, y, z = (s // 2 for s in vol.shape)
        views = (vol[:, :, z].T, vol[:, y, :].T, vol[x, :, :].T)  # RAS: show with origin lower
        for j, (view, name) in enumerate(zip(views, ("axial", "coronal", "sagittal"), strict=True)):
            ax = axes[i, j]
            ax.imshow(view, cmap="gray", vmin=window[0], vmax=window[1], origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    return png_uri(fig)


def site_pairs(real: dict[str, np.ndarray], synthetic: dict[str, np.ndarray]) -> str | None:
    """Per site (rows): the axial and coronal central slices of a real scan and of a case made
    for that site: the scanner style (noise, blur, slice thickness) should match along a row."""
    sites = [s for s in sorted(synthetic) if s in real]
    if not sites:
        return None
    fig, axes = plt.subplots(len(sites), 4, figsize=(8, 2.2 * len(sites)), squeeze=False)
    for i, site in enumerate(sites):
        for k, (vol, who) in enumerate(((real[site], "real"), (synthetic[site], "made for it"))):
            x, y, z = (n // 2 for n in vol.shape)
            for j, (view, name) in enumerate(
                ((vol[:, :, z].T, "axial"), (vol[:, y, :].T, "coronal"))
            ):
                ax = axes[i, 2 * k + j]
                ax.imshow(view, cmap="gray", vmin=-1000, vmax=400, origin="lower")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"{who}: {name}", fontsize=9)
        axes[i, 0].set_ylabel(site, fontsize=9)
    return png_uri(fig)


def hu_histograms(real: dict[str, np.ndarray], synthetic: dict[str, np.ndarray]) -> str:
    """Per class, the HU distribution of real vs synthetic voxels."""
    classes = sorted(set(real) | set(synthetic))
    fig, axes = plt.subplots(1, len(classes), figsize=(3.2 * len(classes), 2.6), squeeze=False)
    bins = np.linspace(-1024, 600, 60)
    for ax, name in zip(axes[0], classes, strict=True):
        for data, label, colour in ((real, "real", "#1f77b4"), (synthetic, "synthetic", "#d62728")):
            if name in data and data[name].size:
                ax.hist(
                    data[name].ravel(),
                    bins=bins,
                    density=True,
                    histtype="step",
                    label=label,
                    color=colour,
                )
        ax.set_title(name, fontsize=9)
        ax.set_yticks([])
        ax.set_xlabel("HU", fontsize=8)
    axes[0][0].legend(fontsize=8)
    return png_uri(fig)


def training_curves(rounds: list[dict[str, Any]]) -> str | None:
    """Per phase, each site's local training loss by round."""
    phases = [
        p for p in ("autoencoder", "decoder", "diffusion") if any(r["phase"] == p for r in rounds)
    ]
    if not phases:
        return None
    fig, axes = plt.subplots(1, len(phases), figsize=(5 * len(phases), 3), squeeze=False)
    for ax, phase in zip(axes[0], phases, strict=True):
        per_site: dict[str, list[tuple[int, float]]] = {}
        for r in rounds:
            if r["phase"] != phase:
                continue
            for s in r.get("sites", []):
                if s.get("loss") is not None:
                    per_site.setdefault(s["site"], []).append((r["round"], s["loss"]))
        for site, points in sorted(per_site.items()):
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker=".", label=site)
        ax.set_title(f"{phase} (federated rounds)", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("local loss")
        ax.legend(fontsize=7)
    return png_uri(fig)


def downstream_bars(results: dict[str, Any]) -> str | None:
    """Per site, balanced accuracy of each arm (mean over seeds) on the real test split."""
    arms = results.get("arms", {})
    if not arms:
        return None
    sites = sorted(next(iter(arms.values()))["summary"]["per_site_balanced_accuracy"])
    fig, ax = plt.subplots(figsize=(1.6 * len(sites) + 2, 3))
    width = 0.8 / len(arms)
    for k, (arm, data) in enumerate(arms.items()):
        per_site = data["summary"]["per_site_balanced_accuracy"]
        means = [per_site[s]["mean"] for s in sites]
        sds = [per_site[s]["sd"] for s in sites]
        ax.bar(np.arange(len(sites)) + k * width, means, width, yerr=sds, label=arm)
    ax.set_xticks(np.arange(len(sites)) + width * (len(arms) - 1) / 2, sites)
    ax.set_ylim(0, 1)
    ax.set_ylabel("balanced accuracy (test)")
    ax.legend(fontsize=8)
    return png_uri(fig)
