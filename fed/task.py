"""What one site does in a federated round, with no Flower in sight.

A site opens only its own ``train`` cases (rows of other sites in the manifest are never read),
runs synthct's training steps on the weights it was sent, and reports what it trained on. The
Flower apps (``client_app``/``server_app``) only move these tensors and numbers around.
Everything that leaves a site is written to its audit log first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from synthct.artifacts import atomic_write_bytes, sha256_bytes
from synthct.audit import append_chained
from synthct.config import SynthctConfig, TrainConfig, config_from_dict
from synthct.data.dataset import CaseSet, load_cases
from synthct.fed.errors import SiteError
from synthct.models.autoencoder import build_autoencoder, build_discriminator
from synthct.models.latent_norm import LatentNorm
from synthct.models.schedulers import training_scheduler
from synthct.models.unet import build_unet, conditioning_for
from synthct.phases import PHASES
from synthct.training import (
    BalancedSampler,
    LatentDecoder,
    autoencoder_step,
    decoder_step,
    detail_range,
    diffusion_step,
    encode_latents,
    proximal_term,
)

__all__ = [
    "PHASES",
    "SiteError",
    "RoundResult",
    "LocalRun",
    "config_to_json",
    "config_from_json",
    "tensors_to_bytes",
    "tensors_from_bytes",
    "payload_digest",
    "ProcessCache",
    "load_site_cases",
    "round_seed",
    "build_phase_model",
    "train_autoencoder_round",
    "train_decoder_round",
    "train_diffusion_round",
    "site_latents",
    "write_audit",
    "OptimizerStateStore",
]

logger = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What a site sends back after local training."""

    state: dict[str, torch.Tensor]
    cases: int
    loss: float
    steps: int


def config_to_json(config: SynthctConfig) -> str:
    return json.dumps(config.model_dump(mode="json"), sort_keys=True)


def config_from_json(text: str) -> SynthctConfig:
    return config_from_dict(json.loads(text), source="<federated run config>")


def tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes (never pickle) for tensors that travel inside a config record."""
    return save_safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def tensors_from_bytes(data: bytes, *, sha256: str, what: str) -> dict[str, torch.Tensor]:
    if sha256_bytes(data) != sha256:
        raise SiteError(f"{what}: sha256 mismatch, refusing the payload")
    return load_safetensors_bytes(data)


def payload_digest(tensors: dict[str, torch.Tensor]) -> tuple[int, str]:
    """(bytes, sha256) over tensor names, dtypes, shapes and raw data, in name order."""
    h = hashlib.sha256()
    size = 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(raw)
        size += len(raw)
    return size, h.hexdigest()


class ProcessCache:
    """What a site process keeps between messages: the ``size`` most recently used entries.

    In Flower's simulation a few Ray actors serve every site in turn (4 sites on 2 actors in the
    demo), so a cache of one site's entry was replaced on nearly every message and each site
    re-read and re-featurised its cases every round. Holding a few sites' entries keeps them;
    in a deployment each message is its own ClientApp process and a cache spans one message.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The entry for ``key``, made by ``make()`` (and kept) when missing."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)  # the least recently used
        return value


_CASE_CACHE = ProcessCache()  # (manifest, site, mtime, vocabulary, split) -> CaseSet


def load_site_cases(
    config: SynthctConfig, manifest: str | Path, site: str, split: str = "train"
) -> CaseSet:
    """This site's cases of one split only; kept per process (``ProcessCache``) while the
    manifest is unchanged, so a site scoring its holdout every round reads it once. An empty
    ``train`` split is an error."""
    if site not in config.site_names:
        raise SiteError(f"site {site!r} is not in the run's config (sites: {config.site_names})")
    manifest = Path(manifest)
    if not manifest.is_file():
        raise SiteError(f"site {site!r}: manifest {manifest} not found")
    source = (
        str(manifest.resolve()),
        site,
        manifest.stat().st_mtime,
        config.labels.vocabulary_hash,
    )

    def read() -> CaseSet:
        cases = load_cases(manifest, config, splits=(split,), sites=(site,))
        if split == "train" and len(cases) == 0:
            raise SiteError(f"site {site!r}: no train cases in {manifest}")
        return cases

    return _CASE_CACHE.get((*source, split), read)


def round_seed(seed: int, phase: str, server_round: int, site: str) -> int:
    """Deterministic per (run seed, phase, round, site): resumed runs redo the same draws."""
    digest = hashlib.sha256(f"{seed}|{phase}|{server_round}|{site}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def build_phase_model(config: SynthctConfig, phase: str) -> nn.Module:
    """The network a phase trains: the autoencoder, its decoding half, or the diffusion UNet."""
    if phase == "autoencoder":
        return build_autoencoder(config.autoencoder, config.site_names)
    if phase == "decoder":
        return LatentDecoder(
            build_autoencoder(config.autoencoder, config.site_names),
            build_discriminator(config.autoencoder),
        )
    if phase == "diffusion":
        return build_unet(
            config.unet,
            latent_channels=config.autoencoder.latent_channels,
            num_classes=config.labels.num_classes,
            num_sites=len(config.site_names),
        )
    raise SiteError(f"unknown phase {phase!r} (expected one of {PHASES})")


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SiteError(
            f"{what}: received weights do not fit the configured model ({exc})"
        ) from None


def _prox(model: nn.Module, mu: float):
    if mu <= 0:
        return None
    return proximal_term(model, [p.detach().clone() for p in model.parameters()], mu)


class OptimizerStateStore:
    """A site's AdamW moments between rounds, kept on the site's own disk and never sent.

    Restarting Adam every round throws its moment estimates away, and the first steps after a
    restart are full-size sign-like updates; in a 30-round autoencoder phase that noise cost
    fidelity on small lesions. The state for round ``r`` is the newest saved one from a round
    before ``r`` (so a resumed run loads exactly what the uninterrupted run loaded); the two
    newest files are kept.
    """

    def __init__(self, root: Path, phase: str) -> None:
        self.root, self.phase = Path(root), phase

    def _files(self) -> dict[int, Path]:
        found = {}
        for path in self.root.glob(f"{self.phase}-round*.safetensors"):
            try:
                found[int(path.stem.rsplit("round", 1)[1])] = path
            except ValueError:
                continue
        return found

    def load_into(self, optimizer: torch.optim.Optimizer, server_round: int) -> int | None:
        """Fill ``optimizer`` with the newest state saved before ``server_round``; its round."""
        earlier = [r for r in self._files() if r < server_round]
        if not earlier:
            return None
        previous = max(earlier)
        path = self._files()[previous]
        try:
            flat = load_safetensors_bytes(path.read_bytes())
        except Exception as exc:  # a torn or foreign file: the site just restarts its moments
            logger.warning("optimizer state %s unreadable (%s); starting fresh", path, exc)
            return None
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        saved = optimizer.state_dict()
        try:
            optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        except (ValueError, KeyError, RuntimeError) as exc:
            logger.warning("optimizer state %s does not fit (%s); starting fresh", path, exc)
            return None
        return previous

    def save(self, optimizer: torch.optim.Optimizer, server_round: int) -> None:
        flat = {
            f"{index}.{name}": value.detach().cpu().contiguous()
            for index, entry in optimizer.state_dict()["state"].items()
            for name, value in entry.items()
            if torch.is_tensor(value)
        }
        atomic_write_bytes(
            self.root / f"{self.phase}-round{server_round:04d}.safetensors",
            tensors_to_bytes(flat),
        )
        for old in sorted(self._files())[:-2]:
            self._files()[old].unlink(missing_ok=True)


@dataclass(frozen=True)
class LocalRun:
    """How one site's round runs: length, seed, FedProx strength, device, and where the
    site keeps its optimiser state (store, server round) if it keeps it."""

    steps: int
    seed: int
    proximal_mu: float = 0.0
    device: torch.device | str = "cpu"
    optimizer_state: tuple[OptimizerStateStore, int] | None = None


def _local_training(
    model: nn.Module,
    weights: dict[str, torch.Tensor],
    what: str,
    cases: CaseSet,
    train: TrainConfig,
    lr: float,
    run: LocalRun,
    step: Callable[..., dict[str, float]],
) -> RoundResult:
    """Start ``model`` from the global ``weights`` and run ``run.steps`` of
    ``step(optimizer, batch_index, generator, extra_loss)`` on class-balanced batches."""
    _load_weights(model, weights, what)
    model.to(run.device)
    generator = torch.Generator().manual_seed(run.seed)
    sampler = BalancedSampler(cases.labels, balanced=train.balanced, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    if run.optimizer_state is not None:
        store, server_round = run.optimizer_state
        store.load_into(optimizer, server_round)
    extra = _prox(model, run.proximal_mu)
    losses = [
        step(optimizer, sampler(train.batch_size), generator, extra)["loss"]
        for _ in range(run.steps)
    ]
    if run.optimizer_state is not None and run.steps:
        store.save(optimizer, server_round)
    return RoundResult(
        state={k: v.detach().cpu() for k, v in model.state_dict().items()},
        cases=len(cases),
        loss=float(sum(losses) / len(losses)) if losses else float("nan"),
        steps=run.steps,
    )


def train_autoencoder_round(
    config: SynthctConfig,
    weights: dict[str, torch.Tensor],
    cases: CaseSet,
    run: LocalRun,
) -> RoundResult:
    """``run.steps`` autoencoder steps from the global weights on this site's cases."""
    ae = build_phase_model(config, "autoencoder")
    torch.manual_seed(run.seed)  # the KL sampling noise inside AutoencoderKL
    detail = detail_range(config.autoencoder, config.data.hu_window)

    def step(optimizer, idx, generator, extra):
        x = cases.images[idx].to(run.device)
        return autoencoder_step(
            ae,
            optimizer,
            x,
            config.autoencoder,
            extra_loss=extra,
            detail=detail,
            patch=config.train.ae_patch,
            generator=generator,
        )

    return _local_training(
        ae, weights, "autoencoder", cases, config.train, config.train.ae_lr, run, step
    )


def train_decoder_round(
    config: SynthctConfig,
    weights: dict[str, torch.Tensor],
    latents: torch.Tensor,
    cases: CaseSet,
    run: LocalRun,
) -> RoundResult:
    """``run.steps`` decoder-only steps from the global decoder, decoding this site's unscaled
    latents (under the frozen encoder) back to its cases."""
    decoder = build_phase_model(config, "decoder")
    detail = detail_range(config.autoencoder, config.data.hu_window)

    def step(optimizer, idx, generator, extra):
        sites = decoder.site_rows(
            [cases.sites[i] for i in idx.tolist()],
            dropout=config.autoencoder.site_style_dropout,
            generator=generator,
        )
        return decoder_step(
            decoder,
            optimizer,
            latents[idx].to(run.device),
            cases.images[idx].to(run.device),
            config.autoencoder,
            sites=sites,
            detail=detail,
            extra_loss=extra,
            patch=config.train.ae_patch,
            generator=generator,
        )

    return _local_training(
        decoder, weights, "decoder", cases, config.train, config.train.decoder_lr, run, step
    )


_LATENT_CACHE = ProcessCache()  # (autoencoder sha256, the site's cases) -> latents


def site_latents(
    config: SynthctConfig,
    autoencoder_weights: dict[str, torch.Tensor],
    autoencoder_sha256: str,
    cases: CaseSet,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Unscaled posterior-mean latents of this site's cases under the frozen autoencoder."""
    key = (autoencoder_sha256, "|".join(cases.paths[:1]) + str(len(cases)))

    def encode() -> torch.Tensor:
        ae = build_phase_model(config, "autoencoder")
        _load_weights(ae, autoencoder_weights, "autoencoder")
        return encode_latents(ae.to(device), cases.images.to(device)).cpu()

    return _LATENT_CACHE.get(key, encode)


def train_diffusion_round(
    config: SynthctConfig,
    weights: dict[str, torch.Tensor],
    latents: torch.Tensor,
    cases: CaseSet,
    run: LocalRun,
    *,
    latent_norm: LatentNorm,
) -> RoundResult:
    """``run.steps`` latent-diffusion steps from the global UNet on this site's latents in the
    pooled normalisation (:mod:`synthct.models.latent_norm`)."""
    unet = build_phase_model(config, "diffusion")
    scheduler = training_scheduler(config.diffusion)
    z0 = latent_norm.apply(latents).to(run.device)
    conditioning = conditioning_for(config)
    sites = conditioning.site_indices(cases.sites)

    def step(optimizer, idx, generator, extra):
        return diffusion_step(
            unet,
            optimizer,
            z0[idx],
            cases.labels[idx].to(run.device),
            scheduler,
            config.diffusion,
            conditioning=conditioning,
            sites=None if sites is None else sites[idx],
            generator=generator,
            extra_loss=extra,
        )

    return _local_training(
        unet, weights, "unet", cases, config.train, config.train.diffusion_lr, run, step
    )


def write_audit(
    audit_dir: Path,
    *,
    site: str,
    phase: str,
    server_round: int,
    tensors: dict[str, torch.Tensor],
    metrics: dict[str, Any],
    keep_payload: bool = False,
) -> dict[str, Any]:
    """Record exactly what leaves the site (before it is sent), hash-chained to the site's
    earlier records (``synthct audit verify``). Returns the record."""
    size, digest = payload_digest(tensors)
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "site": site,
        "phase": phase,
        "round": server_round,
        "tensors": len(tensors),
        "tensor_names_sha256": sha256_bytes("\n".join(sorted(tensors)).encode()),
        "bytes": size,
        "sha256": digest,
        "metrics": metrics,
    }
    if keep_payload:
        name = f"{phase}-round{server_round:04d}.safetensors"
        atomic_write_bytes(audit_dir / "payloads" / name, tensors_to_bytes(tensors))
        record["payload_file"] = f"payloads/{name}"
    return append_chained(audit_dir / "audit.jsonl", record)
