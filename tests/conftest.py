"""Shared fixtures: packaged configs and phantom sites made once per test session."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from synthct.config import SynthctConfig, load_config, packaged_config_path  # noqa: E402

_CHECK = """
<script>
window.addEventListener('load', () => {
  const out = [];
  for (const img of document.images) {
    const c = document.createElement('canvas');
    c.width = img.naturalWidth; c.height = img.naturalHeight;
    const g = c.getContext('2d'); g.drawImage(img, 0, 0);
    const d = c.width ? g.getImageData(0, 0, c.width, c.height).data : [];
    let lo = 255, hi = 0;
    for (let i = 0; i < d.length; i += 4) { const v = d[i] + d[i+1] + d[i+2];
      if (v / 3 < lo) lo = v / 3; if (v / 3 > hi) hi = v / 3; }
    out.push({w: img.naturalWidth, h: img.naturalHeight, range: hi - lo});
  }
  const pre = document.createElement('pre'); pre.id = 'render-check';
  pre.textContent = JSON.stringify({expected: +document.body.dataset.expectedImages, images: out});
  document.body.appendChild(pre);
});
</script>
"""


def _render_check(report, tmp_path) -> dict:
    """Open the report (plus a checking script) in headless Chromium; what it saw."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is needed for this test (.ci/run installs it)"
    page = tmp_path / "checked.html"
    page.write_text(report.read_text().replace("</body>", _CHECK + "</body>"))
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
        "--dump-dom",
        page.as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'<pre id="render-check">(.*?)</pre>', dom, re.S)
    assert found, "the page's check did not run"
    return json.loads(found.group(1).replace("&quot;", '"'))


@pytest.fixture
def render_check():
    """``render_check(report_path, tmp_path)``: what headless Chromium saw of the pictures."""
    return _render_check


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
    """The full demo phantom sites (240 train/holdout + 400 test volumes at 32^3, ~30 s);
    returns the manifest path."""
    from synthct.data.phantoms import write_phantom_sites

    return write_phantom_sites(demo_config, tmp_path_factory.mktemp("demo_sites"))


@pytest.fixture(scope="session")
def demo_reference(demo_config):
    """The shipped phantom reference models (trained on the demo sites)."""
    from synthct.pretrained import load_phantom_reference

    return load_phantom_reference(demo_config.labels.vocabulary_hash)


@pytest.fixture(scope="session")
def demo_real(demo_sites, demo_config, demo_reference):
    """The gate's real side of the demo sites (train and holdout featurised once, ~15 s);
    read-only: every gate test compares its cohorts with it."""
    from synthct.eval.gate import load_real

    return load_real(demo_sites, demo_sites, config=demo_config, reference=demo_reference)


@pytest.fixture(scope="session")
def tiny(demo_config):
    """The demo data with a tiny, quick downstream schedule."""
    down = demo_config.downstream.model_copy(
        update={"channels": [4, 8], "strides": [2, 2], "epochs": 1, "rounds": 1, "seeds": [0]}
    )
    fed = demo_config.federated.model_copy(update={"round_timeout_s": 300})
    return demo_config.model_copy(update={"downstream": down, "federated": fed})


@pytest.fixture(scope="session")
def smoke_generator(tmp_path_factory, smoke_config) -> Path:
    """An untrained smoke-config generator folder: real files, quick to make."""
    from synthct.checkpoint import build_generator, save_generator

    path = tmp_path_factory.mktemp("gen") / "generator"
    save_generator(build_generator(smoke_config, seed=0), path)
    return path
