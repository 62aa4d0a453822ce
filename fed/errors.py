"""Errors of federated runs, importable without Flower or torch (the CLI maps them to exit 2)."""

from __future__ import annotations

from synthct.errors import SynthctError

__all__ = ["FederatedError", "SiteError"]


class FederatedError(SynthctError, RuntimeError):
    """The federated run cannot continue (too few sites, nobody connected, bad state)."""


class SiteError(SynthctError, RuntimeError):
    """A site cannot take part (unknown site, no data, bad payload); the message names it."""
