"""Shared fixtures: packaged configs and phantom sites made once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from synthct.config import SynthctConfig, load_config, packaged_config_path  # noqa: E402


@pytest.fixture(scope="session")
def smoke_config() -> SynthctConfig:
    return load_config(packaged_config_path("smoke"))


@pytest.fixture(scope="session")
def demo_config() -> SynthctConfig:
    return load_config(packaged_config_path("demo"))


@pytest.fixture(scope="session")
def smoke_sites(tmp_path_factory, smoke_config) -> Path:
    """Smoke phantom sites on disk; returns the manifest path. Read-only for tests."""
    from synthct.data.phantoms import write_phantom_sites

    return write_phantom_sites(smoke_config, tmp_path_factory.mktemp("smoke_sites"))


@pytest.fixture(scope="session")
def demo_sites(tmp_path_factory, demo_config) -> Path:
    """The full demo phantom sites (240 volumes at 32^3, ~10 s); returns the manifest path."""
    from synthct.data.phantoms import write_phantom_sites

    return write_phantom_sites(demo_config, tmp_path_factory.mktemp("demo_sites"))
