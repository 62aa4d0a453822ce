"""`synthct data check`: every problem reported at once, each naming the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from synthct.cli import main
from synthct.data.dataset import load_cases
from synthct.data.manifest import (
    ManifestError,
    ManifestRow,
    check_manifest,
    read_manifest,
    write_manifest,
)
from synthct.data.volume_io import write_dicom_series


def test_clean_manifest_passes(smoke_sites, smoke_config):
    assert check_manifest(smoke_sites, smoke_config) == []


@pytest.fixture()
def broken(tmp_path, smoke_sites):
    """A copy of the smoke sites with one of each problem."""
    root = tmp_path / "sites"
    shutil.copytree(smoke_sites.parent, root)
    rows = read_manifest(root / "manifest.csv")
    a = rows[0].path
    (root / rows[1].path).write_bytes(b"")  # zero bytes
    data = (root / rows[2].path).read_bytes()
    (root / rows[2].path).write_bytes(data[: len(data) // 3])  # truncated
    import nibabel as nib

    nan = np.full((8, 8, 8), -1000.0, np.float32)
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(root / "nan.nii.gz"))
    mr = np.full((8, 8, 8), 300.0, np.float32)
    nib.save(nib.Nifti1Image(mr, np.eye(4)), str(root / "mr.nii.gz"))
    write_dicom_series(
        root / "mr_series", np.zeros((8, 8, 4), np.float32), (1, 1, 1), modality="MR"
    )
    rows += [
        ManifestRow("missing.nii.gz", "normal", "site_a", "train"),
        ManifestRow(a, "normal", "site_a", "train"),  # duplicate
        ManifestRow("nan.nii.gz", "normal", "site_a", "train"),
        ManifestRow("mr.nii.gz", "normal", "site_a", "train"),
        ManifestRow("mr_series", "normal", "site_a", "train"),
        ManifestRow(rows[3].path + ".x", "tumour", "site_a", "train"),
        ManifestRow(rows[4].path, "GGO", "site_a", "validation"),
    ]
    write_manifest(root / "manifest.csv", rows)
    return root / "manifest.csv", rows


def test_every_problem_reported_at_once(broken, smoke_config):
    manifest, rows = broken
    problems = "\n".join(check_manifest(manifest, smoke_config))
    assert f"{rows[1].path}: file is empty" in problems
    assert f"{rows[2].path}: unreadable or truncated" in problems
    assert "missing.nii.gz: file not found" in problems
    assert f"duplicate path {rows[0].path}" in problems
    assert "nan.nii.gz: 1 NaN/inf voxels" in problems
    assert "mr.nii.gz: does not look like CT" in problems
    assert "mr_series: modality ['MR'] is not CT" in problems
    assert "label 'tumour'" in problems
    assert "site 'site_a': label 'GGO'" in problems
    assert "split 'validation'" in problems


def test_missing_column(tmp_path):
    (tmp_path / "m.csv").write_text("path,label,site\nx.nii.gz,normal,a\n")
    problems = check_manifest(tmp_path / "m.csv")
    assert any("missing column(s) ['split']" in p for p in problems)
    with pytest.raises(ManifestError, match="missing column"):
        read_manifest(tmp_path / "m.csv")


def test_cli_data_check_exit_codes(broken, smoke_sites, capsys):
    manifest, _ = broken
    assert main(["data", "check", str(smoke_sites), "--config", _smoke()]) == 0
    assert main(["data", "check", str(manifest), "--config", _smoke()]) == 2
    out = capsys.readouterr().out
    assert "problem(s)" in out and "file is empty" in out


def test_loading_fails_naming_the_file_and_keeps_files(broken, smoke_config):
    manifest, rows = broken
    write_manifest(manifest.parent / "some.csv", [r for r in rows if r.split != "validation"])
    before = sorted(p.name for p in manifest.parent.rglob("*"))
    with pytest.raises(ManifestError, match=rows[1].path.split("/")[-1] + ": file is empty"):
        load_cases(manifest.parent / "some.csv", smoke_config, splits=("train", "holdout", "test"))
    assert sorted(p.name for p in manifest.parent.rglob("*")) == before


def test_client_reads_only_its_own_site(smoke_sites, smoke_config, tmp_path):
    """Rows of other sites are dropped before any file is opened (their files may not even be
    readable from here)."""
    root = tmp_path / "sites"
    shutil.copytree(smoke_sites.parent, root)
    for row in read_manifest(root / "manifest.csv"):
        if row.site != "site_a":
            (root / row.path).unlink()
    cases = load_cases(root / "manifest.csv", smoke_config, splits=("train",), sites=["site_a"])
    assert len(cases) > 0 and set(cases.sites) == {"site_a"}


def _smoke() -> str:
    from synthct.config import packaged_config_path

    return str(packaged_config_path("smoke"))


def test_site_manifest_keeps_only_that_site(tmp_path, smoke_sites):
    from synthct.data.manifest import ManifestError, write_site_manifest

    out = write_site_manifest(smoke_sites, "site_b", tmp_path / "b" / "manifest.csv")
    rows = read_manifest(out)
    assert rows and {r.site for r in rows} == {"site_b"}
    assert all(Path(r.path).is_absolute() and Path(r.path).exists() for r in rows)
    with pytest.raises(ManifestError, match="site_z"):
        write_site_manifest(smoke_sites, "site_z", tmp_path / "z.csv")


def test_manifest_saved_with_a_byte_order_mark_reads(tmp_path, smoke_sites):
    """Spreadsheet programs save CSV as UTF-8 with a BOM; its first column is still 'path'."""
    text = smoke_sites.read_text(encoding="utf-8")
    bom = smoke_sites.parent / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert read_manifest(bom) == read_manifest(smoke_sites)


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "is a folder"), (b"path,label\n\xe9t\xe9.nii.gz,normal\n", "not UTF-8 text")],
)
def test_data_check_names_a_folder_or_a_foreign_encoding(tmp_path, capsys, content, message):
    target = tmp_path
    if content is not None:
        target = tmp_path / "latin1.csv"
        target.write_bytes(content)
    assert main(["data", "check", str(target)]) == 2
    out = capsys.readouterr().out
    assert message in out and "Traceback" not in out
