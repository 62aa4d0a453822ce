"""Cohort planning (deficits pooled / per site / explicit) and resumable generation."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from synthct.cli import main
from synthct.cohort import (
    POOLED,
    CohortError,
    generate_cohort,
    parse_counts,
    plan_cohort,
    reference_counts,
)
from synthct.data.dataset import load_cases
from synthct.data.manifest import read_manifest

CLASSES = ["normal", "nodule", "ground_glass", "consolidation"]


def test_balanced_plan_fills_each_class_to_the_largest():
    counts = {
        "a": Counter(normal=10, nodule=4, consolidation=1),
        "b": Counter(normal=6, nodule=6, ground_glass=2),
    }
    pooled = Counter(c.label for c in plan_cohort(counts, CLASSES))
    assert pooled == {"nodule": 6, "ground_glass": 14, "consolidation": 15}
    per_site = plan_cohort(counts, CLASSES, per_site=True)
    by_site = {s: Counter(c.label for c in per_site if c.site == s) for s in ("a", "b")}
    assert by_site["a"] == {"nodule": 6, "ground_glass": 10, "consolidation": 9}
    assert by_site["b"] == {"ground_glass": 4, "consolidation": 6}  # b lacks the rare class
    explicit = plan_cohort(counts, CLASSES, target={"consolidation": 3}, per_site=True)
    assert [(c.site, c.label) for c in explicit].count(("b", "consolidation")) == 3
    assert {c.site for c in plan_cohort(counts, CLASSES)} == {POOLED}
    assert len({c.case_id for c in per_site}) == len(per_site)


def test_counts_parsing_names_the_bad_item():
    assert parse_counts("nodule=3, consolidation=10", CLASSES) == {"nodule": 3, "consolidation": 10}
    for bad in ("tumour=3", "nodule=x", "nodule", "nodule=-1"):
        with pytest.raises(CohortError, match="--counts"):
            parse_counts(bad, CLASSES)


def test_reference_counts_map_site_labels(smoke_config, smoke_sites):
    counts = reference_counts(smoke_sites, smoke_config)
    assert "mass" not in counts["site_b"] and counts["site_b"]["nodule"] > 0
    assert counts["site_b"]["consolidation"] == 0


def test_generation_writes_manifest_and_resumes_without_duplicates(
    tmp_path, smoke_config, smoke_sites, smoke_generator
):
    from synthct.checkpoint import load_generator

    gen = load_generator(smoke_generator)
    plan = plan_cohort(reference_counts(smoke_sites, smoke_config), CLASSES, per_site=True)
    out = tmp_path / "cohort"
    manifest = generate_cohort(gen, smoke_generator, plan, out, batch_size=4, steps=2)
    rows = read_manifest(manifest)
    assert [r.path.split("/")[-1].removesuffix(".nii.gz") for r in rows] == [
        c.case_id for c in plan
    ]
    assert {r.split for r in rows} == {"train"}
    assert all(r.extra["source"].startswith("synthct:") and r.extra["steps"] == "2" for r in rows)
    cases = load_cases(manifest, smoke_config, splits=("train",))  # readable as any manifest
    assert len(cases) == len(plan)
    # simulate an interruption: the last batch's files and rows are lost
    lost = rows[-3:]
    for r in lost:
        (out / r.path).unlink()
    kept_mtimes = {r.path: (out / r.path).stat().st_mtime_ns for r in rows[:-3]}
    generate_cohort(gen, smoke_generator, plan, out, batch_size=4, steps=2)
    again = read_manifest(manifest)
    assert [r.path for r in again] == [r.path for r in rows]
    assert all((out / p).stat().st_mtime_ns == t for p, t in kept_mtimes.items())
    # other settings in the same folder are refused instead of mixing two cohorts
    with pytest.raises(CohortError, match="guidance"):
        generate_cohort(gen, smoke_generator, plan, out, batch_size=4, steps=2, guidance=7.0)


def test_each_case_records_the_guidance_of_its_class(
    tmp_path, smoke_config, smoke_sites, smoke_generator
):
    from synthct.checkpoint import load_generator

    gen = load_generator(smoke_generator)
    sampling = gen.config.sampling.model_copy(update={"class_guidance": {"nodule": 6.0}})
    gen.config = gen.config.model_copy(update={"sampling": sampling})
    plan = plan_cohort(reference_counts(smoke_sites, smoke_config), CLASSES, per_site=True)
    plan = list({c.label: c for c in plan}.values())  # one case per class
    manifest = generate_cohort(gen, smoke_generator, plan, tmp_path / "c", batch_size=4, steps=2)
    default = f"{gen.config.sampling.guidance:g}"
    assert {r.label: r.extra["guidance"] for r in read_manifest(manifest)} == {
        c.label: "6" if c.label == "nodule" else default for c in plan
    }
    # one guidance for all classes is another cohort, not a resume of this one
    with pytest.raises(CohortError, match="class_guidance"):
        generate_cohort(
            gen, smoke_generator, plan, tmp_path / "c", batch_size=4, steps=2, guidance=3.0
        )


def test_an_interrupted_cohort_is_never_read_as_whole(
    tmp_path, smoke_config, smoke_sites, smoke_generator
):
    """Stopped after its first batch, a cohort has no manifest.csv (only the partial list), so
    gating or training on it fails naming why; the same command then finishes it, and a
    first try that wrote nothing does not bind the corrected rerun to its settings."""
    from synthct.checkpoint import load_generator
    from synthct.data.manifest import ManifestError
    from synthct.eval.gate import hash_cohort

    gen = load_generator(smoke_generator)
    plan = plan_cohort(reference_counts(smoke_sites, smoke_config), CLASSES, per_site=True)
    out = tmp_path / "cohort"

    def stop_after_first_batch(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_cohort(
            gen, smoke_generator, plan, out, batch_size=4, steps=2, progress=stop_after_first_batch
        )
    assert not (out / "manifest.csv").exists()
    assert len(read_manifest(out / "manifest.partial.csv")) == 4
    with pytest.raises(ManifestError, match="unfinished cohort"):
        hash_cohort(out / "manifest.csv")
    with pytest.raises(ManifestError, match="unfinished cohort"):
        load_cases(out / "manifest.csv", smoke_config, splits=("train",))
    manifest = generate_cohort(gen, smoke_generator, plan, out, batch_size=4, steps=2)
    assert len(read_manifest(manifest)) == len(plan)
    assert not (out / "manifest.partial.csv").exists()
    # a try that wrote no case leaves nothing that refuses other settings
    empty = tmp_path / "empty"
    with pytest.raises(KeyboardInterrupt):
        generate_cohort(
            gen,
            smoke_generator,
            plan[:1],
            empty,
            batch_size=1,
            steps=2,
            progress=stop_after_first_batch,
        )
    (empty / "manifest.partial.csv").unlink()
    for case in (empty / "cases").rglob("*.nii.gz"):
        case.unlink()
    generate_cohort(gen, smoke_generator, plan[:1], empty, batch_size=2, steps=2)


def test_cli_generate_and_bad_label(tmp_path, smoke_sites, smoke_generator):
    out = tmp_path / "c"
    args = ["generate", "--generator", str(smoke_generator.parent), "--data", str(smoke_sites)]
    code = main([*args, "--out", str(out), "--counts", "consolidation=2", "--steps", "2"])
    assert code == 0
    assert [r.label for r in read_manifest(out / "manifest.csv")] == ["consolidation"] * 2
    assert main([*args, "--out", str(tmp_path / "d"), "--counts", "tumour=2"]) == 2


def test_a_dicom_cohort_reads_back_as_the_same_volumes_marked_synthetic(
    tmp_path, smoke_config, smoke_sites, smoke_generator
):
    """``--format dicom``: one CT series per case with correct geometry, rescale and fresh
    UIDs, marked DERIVED/SECONDARY and naming the generator's sha256, no patient identity;
    read back through the manifest it is the NIfTI cohort's HU within rounding, and the gate's
    hashes cover every slice."""
    import pydicom

    from synthct.checkpoint import generator_sha256
    from synthct.eval.gate import hash_cohort

    args = ["generate", "--generator", str(smoke_generator.parent), "--data", str(smoke_sites)]
    args += ["--counts", "nodule=2,consolidation=1", "--steps", "2"]
    assert main([*args, "--out", str(tmp_path / "nii")]) == 0
    assert main([*args, "--out", str(tmp_path / "dcm"), "--format", "dicom"]) == 0
    assert main(["data", "check", str(tmp_path / "dcm" / "manifest.csv")]) == 0
    nii = load_cases(tmp_path / "nii" / "manifest.csv", smoke_config, splits=("train",))
    dcm = load_cases(tmp_path / "dcm" / "manifest.csv", smoke_config, splits=("train",))
    window = smoke_config.data.hu_window
    half_hu = 0.5 / (window[1] - window[0]) * 2  # rounding to whole HU, in model units
    assert torch.allclose(nii.images, dcm.images, atol=half_hu + 1e-6)
    assert (nii.labels == dcm.labels).all()
    rows = read_manifest(tmp_path / "dcm" / "manifest.csv")
    series = [sorted((tmp_path / "dcm" / r.path).glob("*.dcm")) for r in rows]
    assert all(len(s) == smoke_config.data.shape[2] for s in series)
    first = pydicom.dcmread(series[0][0])
    assert list(first.ImageType) == ["DERIVED", "SECONDARY"]
    assert first.PatientID == "" and str(first.PatientName) == ""
    assert generator_sha256(smoke_generator) in first.DerivationDescription
    assert list(first.PixelSpacing) == [
        smoke_config.data.spacing_mm[1],
        smoke_config.data.spacing_mm[0],
    ]
    other = pydicom.dcmread(series[1][0])
    assert first.SeriesInstanceUID != other.SeriesInstanceUID
    # the gate's record changes when any one slice does
    before, _ = hash_cohort(tmp_path / "dcm" / "manifest.csv")
    series[0][3].write_bytes(series[0][3].read_bytes()[:-2] + b"\x00\x00")
    after, _ = hash_cohort(tmp_path / "dcm" / "manifest.csv")
    assert before["files"][rows[0].path] != after["files"][rows[0].path]
    assert before["files"][rows[1].path] == after["files"][rows[1].path]
