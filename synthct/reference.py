"""Reference models every quality check uses: a real-only classifier and its encoder.

A small 3D CNN (MONAI convolution blocks) trained on ``train`` real volumes only, then frozen.
Its penultimate activations are the *reference encoder* features (for Fréchet distance, KID,
PRDC, nearest-neighbour privacy checks); its predictions measure conditioning accuracy.
Saved as safetensors + JSON (vocabulary, its hash, weights sha256, holdout accuracy).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from synthct.artifacts import read_json, write_json
from synthct.checkpoint import CheckpointError, load_tensors, save_tensors
from synthct.config import SynthctConfig
from synthct.data.dataset import CaseSet

__all__ = [
    "ReferenceNet",
    "ReferenceModel",
    "train_reference",
    "train_reference_for",
    "fit_reference",
    "holdout_report",
    "evaluate_classifier",
    "save_reference",
    "load_reference",
    "augment",
]

logger = logging.getLogger(__name__)


class ReferenceNet(nn.Module):
    """Conv3d stages (BatchNorm) -> pooled features
    -> linear classifier. ``features``: B×1×X×Y×Z -> B×(2·channels[-1])."""

    def __init__(self, num_classes: int, channels: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.num_classes, self.channels = num_classes, tuple(channels)
        layers: list[nn.Module] = []
        c_in = 1
        for c in channels:
            layers += [
                Convolution(3, c_in, c, kernel_size=3, act="RELU", norm="BATCH"),
                Convolution(3, c, c, kernel_size=3, act="RELU", norm="BATCH"),
                nn.MaxPool3d(2),
            ]
            c_in = c
        # a last 1x1x1 conv without normalisation: pooling GroupNorm output directly would give
        # (nearly) the same mean for every input, i.e. collapsed features
        layers += [nn.Conv3d(c_in, c_in, kernel_size=1), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(0.2)
        self.head = nn.Linear(2 * channels[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return torch.cat([h.mean(dim=(2, 3, 4)), h.amax(dim=(2, 3, 4))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


@dataclass
class ReferenceModel:
    """A frozen reference network with its vocabulary and provenance."""

    net: ReferenceNet
    classes: list[str]
    vocabulary_hash: str
    info: dict[str, Any]

    def to(self, device: torch.device | str) -> ReferenceModel:
        """Run the network on ``device``; inputs may live anywhere, outputs come back on CPU."""
        self.net.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Class probabilities N×K (CPU) for model-space images N×1×X×Y×Z."""
        self.net.eval()
        return torch.cat(
            [
                F.softmax(self.net(images[i : i + batch_size].to(self.device)), 1).cpu()
                for i in range(0, len(images), batch_size)
            ]
        )

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Penultimate-layer features N×D (CPU): the encoder space the gate compares in."""
        self.net.eval()
        return torch.cat(
            [
                self.net.features(images[i : i + batch_size].to(self.device)).cpu()
                for i in range(0, len(images), batch_size)
            ]
        )


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable 3D Gaussian blur (replicate padding) of a B×1×X×Y×Z batch."""
    radius = max(1, int(3 * sigma + 0.5))
    grid = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (grid / sigma) ** 2)
    kernel = kernel / kernel.sum()
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = len(kernel)
        pad = [0] * 6
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = radius
        x = F.conv3d(F.pad(x, pad, mode="replicate"), kernel.view(shape))
    return x


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Left-right flip, shifts of up to 2 voxels, reconstruction-kernel blur (sites differ in
    it, and generated volumes are smoother than scans), intensity jitter and noise."""
    b = x.shape[0]
    if float(torch.rand(1, generator=generator)) < 0.5:
        x = _gaussian_blur(x, 0.3 + 0.8 * float(torch.rand(1, generator=generator)))
    flip = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None, None], x.flip(2), x)
    shifts = torch.randint(-2, 3, (3,), generator=generator).tolist()
    x = torch.roll(x, shifts=shifts, dims=(2, 3, 4))
    scale = 1 + 0.03 * torch.randn(b, 1, 1, 1, 1, generator=generator)
    offset = 0.02 * torch.randn(b, 1, 1, 1, 1, generator=generator)
    noise = (
        0.02
        * torch.rand(b, 1, 1, 1, 1, generator=generator)
        * torch.randn(x.shape, generator=generator)
    )
    return (x * scale + offset + noise).clamp(-1, 1)


def evaluate_classifier(
    probs: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> dict[str, Any]:
    """Accuracy, per-class recall (NaN-free: classes absent from ``labels`` are omitted) and
    balanced accuracy over the classes present."""
    pred = probs.argmax(1)
    per_class = {}
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            per_class[c] = float((pred[mask] == c).float().mean())
    return {
        "accuracy": float((pred == labels).float().mean()) if len(labels) else float("nan"),
        "per_class_recall": per_class,
        "balanced_accuracy": sum(per_class.values()) / max(len(per_class), 1),
    }


def fit_reference(
    net: ReferenceNet,
    train: CaseSet,
    *,
    epochs: int,
    seed: int,
    lr: float = 2e-3,
    one_cycle: bool = True,
    batch_size: int = 8,
    optimizer: torch.optim.Optimizer | None = None,
    progress: Callable[..., None] | None = None,
    device: torch.device | str | None = None,
) -> float:
    """Train ``net`` in place on ``train`` (class-balanced batches, blur/flip/noise
    augmentation, label smoothing); returns the mean loss. ``one_cycle`` warms up and anneals
    within the call (central training); a federated round passes the round's ``lr`` and keeps
    it constant, the server annealing it over rounds, and may pass the site's ``optimizer``
    (AdamW over ``net``'s parameters) with the moments it kept from earlier rounds."""
    from synthct.training import BalancedSampler

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    net.to(device)
    if optimizer is None:
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    total = epochs * max(len(train) // batch_size, 1)
    scheduler = (
        torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total)
        if one_cycle
        else None
    )
    sampler = BalancedSampler(train.labels, balanced=True, generator=generator)
    net.train()
    losses = []
    for step in range(total):
        idx = sampler(batch_size)
        x = augment(train.images[idx], generator).to(device)  # augmented on CPU: reproducible
        loss = F.cross_entropy(net(x), train.labels[idx].to(device), label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, total, loss=losses[-1])
    net.eval()
    return float(sum(losses) / max(len(losses), 1))


def holdout_report(model: ReferenceModel, holdout: CaseSet) -> dict[str, Any]:
    """The ``info["holdout"]`` block: accuracy, balanced accuracy, recall per class name."""
    metrics = evaluate_classifier(model.predict(holdout.images), holdout.labels, len(model.classes))
    return {
        "cases": len(holdout),
        "accuracy": metrics["accuracy"],
        "balanced_accuracy": metrics["balanced_accuracy"],
        "per_class_recall": {model.classes[c]: v for c, v in metrics["per_class_recall"].items()},
    }


def train_reference(
    train: CaseSet,
    *,
    classes: list[str],
    vocabulary_hash: str,
    epochs: int,
    seed: int,
    holdout: CaseSet | None = None,
    batch_size: int = 8,
    progress: Callable[..., None] | None = None,
    device: torch.device | str = "cpu",
) -> ReferenceModel:
    """Train on pooled real ``train`` cases (central mode) on ``device``; report holdout. The
    model comes back on CPU (it is saved and shipped from there)."""
    torch.manual_seed(seed)
    net = ReferenceNet(len(classes))
    fit_reference(
        net,
        train,
        epochs=epochs,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        device=device,
    )
    net.requires_grad_(False)
    model = ReferenceModel(
        net,
        list(classes),
        vocabulary_hash,
        {"train_cases": len(train), "epochs": epochs, "seed": seed, "trained": "central"},
    )
    if holdout is not None and len(holdout):
        model.info["holdout"] = holdout_report(model, holdout)
        logger.info("reference classifier holdout accuracy %.3f", model.info["holdout"]["accuracy"])
    return model.to("cpu")


def train_reference_for(
    config: SynthctConfig,
    train: CaseSet,
    holdout: CaseSet | None,
    *,
    seed: int,
    progress: Callable[..., None] | None = None,
    device: torch.device | str = "cpu",
) -> ReferenceModel:
    """:func:`train_reference` with the run config's vocabulary and epochs: the one place a
    config becomes a central reference training (the trainer and the pipeline's stage)."""
    return train_reference(
        train,
        classes=list(config.labels.classes),
        vocabulary_hash=config.labels.vocabulary_hash,
        epochs=config.train.reference_epochs,
        seed=seed,
        holdout=holdout,
        progress=progress,
        device=device,
    )


def save_reference(model: ReferenceModel, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = save_tensors(directory / "reference.safetensors", model.net.state_dict())
    write_json(
        directory / "reference.json",
        {
            "classes": model.classes,
            "vocabulary_hash": model.vocabulary_hash,
            "channels": list(model.net.channels),
            "weights": record,
            "info": model.info,
        },
        kind="reference-model",
    )
    return directory


def load_reference(directory: str | Path, *, vocabulary_hash: str | None = None) -> ReferenceModel:
    """Load a frozen reference model; refuse a vocabulary that differs from the expected one."""
    directory = Path(directory)
    meta_path = directory / "reference.json"
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path}: no reference model here")
    meta = read_json(meta_path)
    if vocabulary_hash is not None and meta["vocabulary_hash"] != vocabulary_hash:
        raise CheckpointError(
            f"{meta_path}: vocabulary {meta['classes']} (hash {meta['vocabulary_hash']}) does not match {vocabulary_hash}"
        )
    weights = meta["weights"]
    state = load_tensors(
        directory / weights["file"], sha256=weights["sha256"], size=weights["bytes"]
    )
    net = ReferenceNet(len(meta["classes"]), tuple(meta["channels"]))
    net.load_state_dict(state, strict=True)
    net.eval().requires_grad_(False)
    info = {**meta["info"], "weights_sha256": weights["sha256"]}
    return ReferenceModel(net, meta["classes"], meta["vocabulary_hash"], info)
