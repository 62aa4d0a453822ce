"""How much accelerator memory each phase of a config needs, measured without allocating it.

Each phase (a training step of the autoencoder, the decoder phase, the diffusion UNet; a
sampling batch; decoding) is run once at the config's real sizes on PyTorch's ``meta``
device, where tensors have shapes and dtypes but no storage: a 128^3 autoencoder step is
"run" on a laptop in seconds. A dispatch mode counts every tensor the ops create and frees
it when the last tensor holding its storage goes away (Python frees intermediates as soon as
nothing refers to them, as the CUDA caching allocator then may reuse them), so the peak of
live bytes is the step's activation peak; weights, gradients and AdamW's two moments are
added as they are held for the whole step. fp32 throughout; bf16 autocast roughly halves
the activations. Not counted: the CUDA context (~0.3-0.5 GiB), cuDNN workspaces and
allocator fragmentation (allow ~25 %).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from synthct.config import SynthctConfig
from synthct.models.autoencoder import build_autoencoder, build_discriminator
from synthct.models.unet import build_unet

__all__ = ["PhaseMemory", "LiveBytes", "estimate_memory", "peak_bytes"]

MIB = 2**20


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensors created inside it that are still referenced; ``peak`` is
    the most at any moment. Storages shared by views count once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._holders: dict[int, int] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self._holders[key] -= 1
        if not self._holders[key]:
            del self._holders[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, nbytes = storage._cdata, storage.nbytes()
                if key not in self._holders:
                    self._holders[key] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self._holders[key] += 1
                weakref.finalize(t, self._release, key, nbytes)
        return out


def peak_bytes(step: Callable[[], object]) -> int:
    """Peak live bytes of the tensors ``step()`` creates (its inputs and parameters not
    counted: create those before)."""
    with LiveBytes() as counter:
        step()
    return counter.peak


@dataclass(frozen=True)
class PhaseMemory:
    """One phase's estimate in MiB: held for the whole step + the step's activation peak."""

    phase: str
    batch: int
    shape: tuple[int, ...]
    weights_mib: float
    optimizer_mib: float
    activations_mib: float

    @property
    def total_mib(self) -> float:
        return self.weights_mib + self.optimizer_mib + self.activations_mib

    def as_dict(self) -> dict[str, object]:
        return {
            "phase": self.phase,
            "batch": self.batch,
            "input_shape": list(self.shape),
            "weights_mib": round(self.weights_mib, 1),
            "adamw_mib": round(self.optimizer_mib, 1),
            "activations_mib": round(self.activations_mib, 1),
            "total_mib": round(self.total_mib, 1),
        }


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _training(
    phase: str, model: nn.Module, x: torch.Tensor, loss: Callable, *, ema: bool = False
) -> PhaseMemory:
    """Forward + backward of one step (the gradients, made in the backward pass, are part of
    its peak); weights (twice with an ``ema`` copy) and AdamW's two moments are held
    throughout."""
    trained = [p for p in model.parameters() if p.requires_grad]
    adamw = 2 * _nbytes(trained)
    peak = peak_bytes(lambda: loss(model, x).backward())
    for p in trained:
        p.grad = None
    weights = _nbytes(model.parameters()) * (2 if ema else 1)
    return PhaseMemory(
        phase, x.shape[0], tuple(x.shape[1:]), weights / MIB, adamw / MIB, peak / MIB
    )


def _inference(phase: str, model: nn.Module, x: torch.Tensor, run: Callable) -> PhaseMemory:
    def step() -> None:
        with torch.no_grad():
            run(model, x)

    peak = peak_bytes(step)
    weights = _nbytes(model.parameters())
    return PhaseMemory(phase, x.shape[0], tuple(x.shape[1:]), weights / MIB, 0.0, peak / MIB)


def estimate_memory(
    config: SynthctConfig, *, batch_size: int | None = None, device: str = "meta"
) -> list[PhaseMemory]:
    """Per phase, the memory one step of ``config`` needs (``batch_size``: default the
    config's training and sampling batches). ``device="cpu"`` runs the same steps on real
    tensors (small configs only): the accounting is the same, which the tests check."""
    train_batch = batch_size or config.train.batch_size
    sample_batch = batch_size or config.sampling.batch_size
    patch = tuple(config.train.ae_patch or config.data.shape)
    f = config.autoencoder.downsample
    latent = config.latent_shape
    num_classes = config.labels.num_classes
    with torch.device(device):
        ae = build_autoencoder(config.autoencoder, config.site_names)
        unet = build_unet(
            config.unet,
            latent_channels=config.autoencoder.latent_channels,
            num_classes=num_classes,
            num_sites=len(config.site_names),
        )
        disc = build_discriminator(config.autoencoder)
        x_patch = torch.empty(train_batch, 1, *patch)
        z_patch = torch.empty(train_batch, latent[0], *(p // f for p in patch))
        z_train = torch.empty(train_batch, *latent)
        z_sample = torch.empty(2 * sample_batch, *latent)  # guidance: one doubled batch
        window = config.sampling.decode_patch
        z_decode = (  # sliding-window decoding: one window at a time
            torch.empty(1, latent[0], *(min(window, n) for n in latent[1:]))
            if window
            else torch.empty(sample_batch, *latent)
        )
    t = torch.zeros(1, dtype=torch.long, device=device)

    def ae_loss(model, x):
        recon, mu, sigma = model(x)
        return (recon - x).abs().mean() + (mu.pow(2) + sigma.pow(2)).mean()

    def decoder_loss(model, z):
        recon = model.decode(z)
        loss = recon.abs().mean()
        if disc is not None and config.autoencoder.adversarial_weight > 0:
            loss = loss + disc(recon)[-1].mean()
        return loss

    def denoise(model, z):
        labels = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
        return model(z, t.expand(z.shape[0]), class_labels=labels)

    phases = [_training("autoencoder", ae, x_patch, ae_loss)]
    ae.encoder.requires_grad_(False)  # the decoder phase trains the decoder only
    if hasattr(ae, "quant_conv_mu"):
        ae.quant_conv_mu.requires_grad_(False)
        ae.quant_conv_log_sigma.requires_grad_(False)
    phases.append(_training("decoder", ae, z_patch, decoder_loss))
    diffusion_loss = lambda m, z: denoise(m, z).pow(2).mean()  # noqa: E731
    phases.append(_training("diffusion", unet, z_train, diffusion_loss, ema=True))
    phases.append(_inference("sampling step", unet, z_sample, denoise))
    name = "decode window" if config.sampling.decode_patch else "decode"
    phases.append(_inference(name, ae, z_decode, lambda m, z: m.decode(z)))
    return phases
