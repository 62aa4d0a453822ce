"""`synthct export-bundle` writes a MONAI bundle that `monai.bundle.run` loads and samples
from, exactly as synthct itself samples; a tampered weight file in the bundle is refused."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run as run_bundle

from synthct.checkpoint import CheckpointError, generator_sha256, load_generator
from synthct.cli import main
from synthct.pretrained import phantom_dir
from synthct.sampling import labels_to_indices, sample_volumes

# monai.bundle's notice on every run that configs run code: these are the bundles we wrote
pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "phantom"
    assert main(["export-bundle", "--generator", "pretrained", "--out", str(out)]) == 0
    return out


def _run(bundle: Path, out: Path, labels: list[str]) -> None:
    logging.getLogger("monai").setLevel(logging.ERROR)  # its eval/_target_ notice, each run
    run_bundle(
        run_id="run",
        config_file=str(bundle / "configs" / "inference.json"),
        meta_file=str(bundle / "configs" / "metadata.json"),
        bundle_root=str(bundle),
        output_dir=str(out),
        labels=labels,
    )


def test_bundle_metadata_and_weights(bundle):
    shipped = phantom_dir() / "generator"
    gen = load_generator(shipped)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["label_vocabulary"] == list(gen.config.labels.classes)
    assert meta["generator_sha256"] == generator_sha256(shipped)
    out = meta["network_data_format"]["outputs"]["pred"]
    assert out["spatial_shape"] == list(gen.config.data.shape) and out["modality"] == "CT"
    assert meta["inference_settings"]["guidance"] == gen.config.sampling.guidance
    assert generator_sha256(bundle / "models" / "generator") == generator_sha256(shipped)


def test_monai_bundle_run_samples_as_synthct_does(bundle, tmp_path):
    labels = ["nodule", "consolidation"]
    _run(bundle, tmp_path / "out", labels)
    files = sorted((tmp_path / "out").glob("*.nii.gz"))
    assert [f.name for f in files] == [
        "consolidation_seed0_0001.nii.gz",
        "nodule_seed0_0000.nii.gz",
    ]
    gen = load_generator(phantom_dir() / "generator")
    expected = sample_volumes(
        gen, labels_to_indices(gen, labels), generator=torch.Generator().manual_seed(0)
    )
    for i, name in enumerate(labels):
        image = nib.load(tmp_path / "out" / f"{name}_seed0_{i:04d}.nii.gz")
        assert image.shape == tuple(gen.config.data.shape)
        assert np.allclose(image.header.get_zooms(), gen.config.data.spacing_mm)
        written = np.asarray(image.dataobj, dtype=np.float32)
        assert np.abs(written - expected[i, 0].numpy()).max() <= 0.5 + 1e-3  # int16 rounding


def test_a_tampered_bundle_is_refused(bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    weights = copy / "models" / "generator" / "unet" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RuntimeError) as failed:  # monai.bundle wraps the component's error
        _run(copy, tmp_path / "out", ["normal"])
    cause = failed.value
    while cause is not None and not isinstance(cause, CheckpointError):
        cause = cause.__cause__
    assert cause is not None and "unet/model.safetensors: sha256 does not match" in str(cause)
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_folder_in_use(bundle, capsys):
    assert main(["export-bundle", "--generator", "pretrained", "--out", str(bundle)]) == 2
    assert "is not an empty folder" in capsys.readouterr().err


def test_the_monai_bundle_command_line_samples(bundle, tmp_path):
    """The README's command: MONAI's own bundle CLI (python -m monai.bundle run)."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            str(bundle / "configs" / "inference.json"),
            "--meta_file",
            str(bundle / "configs" / "metadata.json"),
            "--bundle_root",
            str(bundle),
            "--output_dir",
            str(tmp_path / "cli"),
            "--labels",
            "['ground_glass']",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert [p.name for p in (tmp_path / "cli").iterdir()] == ["ground_glass_seed0_0000.nii.gz"]
