"""synthct: federated 3D latent-diffusion CT generation with gated synthetic cohorts."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from synthct import lean_imports

lean_imports.install()  # before anything imports monai

try:
    __version__ = version("synthct")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
