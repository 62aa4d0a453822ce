"""NIfTI and DICOM series round trips and error paths."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from synthct.data.phantoms import render_phantom
from synthct.data.preprocess import prepare_volume
from synthct.data.volume_io import (
    VolumeError,
    read_volume,
    write_dicom_series,
    write_nifti,
)


@pytest.fixture(scope="module")
def phantom(smoke_config):
    site = smoke_config.data.sites[0]
    hu, spacing = render_phantom(np.random.default_rng(0), "nodule", site, (16, 16, 16))
    return np.round(hu), spacing


def test_nifti_round_trip_and_lps_storage(tmp_path, phantom, smoke_config):
    hu, spacing = phantom
    write_nifti(tmp_path / "ras.nii.gz", hu, spacing, orientation="RAS")
    write_nifti(tmp_path / "lps.nii.gz", hu, spacing, orientation="LPS")
    ras = read_volume(tmp_path / "ras.nii.gz")
    lps = read_volume(tmp_path / "lps.nii.gz")
    assert np.array_equal(ras.hu, hu)
    assert ras.spacing == pytest.approx(spacing)
    assert not np.array_equal(lps.hu, hu)  # stored flipped ...
    a = prepare_volume(ras, smoke_config.data).image
    b = prepare_volume(lps, smoke_config.data).image
    assert np.allclose(a.numpy(), b.numpy(), atol=1e-5)  # ... but reoriented to the same RAS


def test_dicom_series_shuffled_with_intercept_equals_nifti(tmp_path, phantom, smoke_config):
    hu, spacing = phantom
    order = list(np.random.default_rng(1).permutation(hu.shape[2]))
    files = write_dicom_series(
        tmp_path / "series", hu, spacing, intercept=-1024.0, file_order=order
    )
    assert len(files) == hu.shape[2]
    write_nifti(tmp_path / "ref.nii.gz", hu, spacing)
    dicom = read_volume(tmp_path / "series")
    nifti = read_volume(tmp_path / "ref.nii.gz")
    assert dicom.spacing == pytest.approx(spacing)
    a = prepare_volume(dicom, smoke_config.data)
    b = prepare_volume(nifti, smoke_config.data)
    assert np.allclose(a.image.numpy(), b.image.numpy(), atol=1e-5)
    assert a.original_spacing == pytest.approx(spacing)


def test_read_pydicom_bundled_ct_small():
    volume = read_volume(get_testdata_file("CT_small.dcm"))
    assert volume.hu.shape == (128, 128, 1)
    assert volume.spacing[:2] == pytest.approx((0.661468, 0.661468))
    assert volume.hu.min() < -500 and volume.hu.max() > 200  # rescale applied: air and tissue


def test_non_ct_dicom_refused(tmp_path, phantom):
    hu, spacing = phantom
    write_dicom_series(tmp_path / "mr", hu, spacing, modality="MR")
    with pytest.raises(VolumeError, match="is not CT"):
        read_volume(tmp_path / "mr")


def test_corrupt_inputs_named(tmp_path, phantom):
    hu, spacing = phantom
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    with pytest.raises(VolumeError, match="empty.nii.gz: file is empty"):
        read_volume(empty)
    write_nifti(tmp_path / "ok.nii.gz", hu, spacing)
    data = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(VolumeError, match="cut.nii.gz: unreadable or truncated"):
        read_volume(tmp_path / "cut.nii.gz")
    bad = hu.copy()
    bad[3, 3, 3] = np.nan
    import nibabel as nib

    nib.save(nib.Nifti1Image(bad.astype(np.float32), np.eye(4)), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(VolumeError, match="nan.nii.gz: 1 NaN/inf voxels"):
        read_volume(tmp_path / "nan.nii.gz")
    nib.save(
        nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(tmp_path / "flat.nii.gz")
    )
    with pytest.raises(VolumeError, match="expected a 3D volume"):
        read_volume(tmp_path / "flat.nii.gz")
    with pytest.raises(VolumeError, match="file not found"):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(VolumeError, match="unknown volume format"):
        read_volume(tmp_path / "x.txt")
    assert gzip  # imported for clarity of the truncated-gzip case
