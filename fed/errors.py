"""Errors of federated runs, importable without Flower or torch (the CLI maps them to exit 2)."""

from __future__ import annotations

__all__ = ["FederatedError", "SiteError"]


class FederatedError(RuntimeError):
    """The federated run cannot continue (too few sites, nobody connected, bad state)."""


class SiteError(RuntimeError):
    """A site cannot take part (unknown site, no data, bad payload); the message names it."""
