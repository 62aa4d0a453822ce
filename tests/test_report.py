"""The HTML report renders in headless Chromium: every picture loads and is not blank."""

from __future__ import annotations

import numpy as np
import pytest

from synthct.report import write_report


@pytest.fixture
def volumes():
    rng = np.random.default_rng(0)
    vol = np.full((3, 16, 16, 16), -1000.0)
    vol[:, 3:13, 3:13, 2:14] = 40.0
    vol[:, 5:8, 5:11, 4:12] = -850.0
    return vol + rng.normal(0, 20, vol.shape)


def test_report_pictures_render_and_are_not_blank(tmp_path, volumes, render_check):
    rounds = [
        {"phase": p, "round": r, "sites": [{"site": s, "loss": 1.0 / r} for s in ("a", "b")]}
        for p in ("autoencoder", "diffusion")
        for r in (1, 2, 3)
    ]
    per_site = {"a": {"mean": 0.7, "sd": 0.0}, "b": {"mean": 0.5, "sd": 0.0}}
    summary = {
        "balanced_accuracy": {"mean": 0.6, "sd": 0.0},
        "macro_auc": {"mean": 0.8, "sd": 0.0},
        "recall_c": {"mean": 0.3, "sd": 0.0},
        "worst_site_balanced_accuracy": {"mean": 0.5, "sd": 0.0},
        "per_site_balanced_accuracy": per_site,
    }
    downstream = {"rare": ["c"], "arms": {"real": {"summary": summary}}}
    report = write_report(
        tmp_path / "report.html",
        title="t",
        summary={"k": 1},
        synthetic={"b": volumes, "c": volumes[:2]},
        real={"b": volumes},
        rounds=rounds,
        gate=None,
        downstream=downstream,
        provenance={"config": "x"},
    )
    text = report.read_text()
    assert 'src="data:image/png;base64,' in text and "http" not in text.split("<body")[1][:0]
    seen = render_check(report, tmp_path)
    # 2 synthetic + 1 real montage, HU histograms, training curves, downstream bars
    assert seen["expected"] == 6 == len(seen["images"])
    for img in seen["images"]:
        assert img["w"] > 50 and img["h"] > 50 and img["range"] > 50
