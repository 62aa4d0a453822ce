"""Reading and writing CT volumes: NIfTI (nibabel) and DICOM series (pydicom).

A volume in memory is ``(hu, affine)``: a float32 array in the file's voxel order and a 4×4
voxel-to-RAS-world affine in mm. Reorientation and resampling happen in
:mod:`synthct.data.preprocess`. Every failure raises :class:`VolumeError` naming the file and
the problem.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from synthct.artifacts import atomic_path
from synthct.errors import SynthctError

__all__ = [
    "VolumeError",
    "Volume",
    "read_volume",
    "read_nifti",
    "read_dicom_series",
    "write_nifti",
    "write_dicom_series",
    "orientation_affine",
]


class VolumeError(SynthctError, ValueError):
    """A volume could not be used; the message names the file and the problem."""


class Volume:
    """A CT volume in HU with its voxel-to-RAS affine and where it came from."""

    __slots__ = ("hu", "affine", "source")

    def __init__(self, hu: np.ndarray, affine: np.ndarray, source: str) -> None:
        self.hu, self.affine, self.source = hu, affine, source

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


def orientation_affine(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], orientation: str
) -> np.ndarray:
    """Affine of a volume centred on the world origin whose voxel axes point ``RAS`` or ``LPS``."""
    signs = np.array([1.0, 1.0, 1.0]) if orientation == "RAS" else np.array([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = np.diag(signs * np.asarray(spacing))
    affine[:3, 3] = -signs * np.asarray(spacing) * (np.asarray(shape) - 1) / 2.0
    return affine


def write_nifti(
    path: str | Path,
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    orientation: str = "RAS",
) -> None:
    """Write a RAS-ordered HU array as int16 NIfTI, stored in ``orientation`` (RAS or LPS)."""
    data = np.asarray(hu)
    if orientation == "LPS":
        data = data[::-1, ::-1, :]
    elif orientation != "RAS":
        raise ValueError(f"orientation must be 'RAS' or 'LPS', got {orientation!r}")
    affine = orientation_affine(data.shape, spacing, orientation)
    image = nib.Nifti1Image(np.round(data).astype(np.int16), affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path = Path(path)
    with atomic_path(path) as tmp:
        # nibabel chooses compression from the suffix, so keep it on the temporary name
        tmp_nii = tmp.with_name(tmp.name + "".join(path.suffixes))
        nib.save(image, str(tmp_nii))
        tmp_nii.replace(tmp)


def read_nifti(path: str | Path) -> Volume:
    path = Path(path)
    try:
        image = nib.load(str(path))
        hu = np.asarray(image.get_fdata(dtype=np.float32))
    except (
        OSError,
        EOFError,
        zlib.error,
        gzip.BadGzipFile,
        ValueError,
        nib.filebasedimages.ImageFileError,
    ) as exc:
        raise VolumeError(f"{path}: unreadable or truncated NIfTI ({exc})") from None
    if hu.ndim == 4 and hu.shape[3] == 1:
        hu = hu[..., 0]
    if hu.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got shape {tuple(hu.shape)}")
    return Volume(hu, np.asarray(image.affine, dtype=np.float64), str(path))


def read_dicom_series(source: str | Path | list[Path]) -> Volume:
    """Read one CT series (a folder, or an explicit list of files), sorted by slice position.

    Files are ordered by ``ImagePositionPatient`` projected on the normal of
    ``ImageOrientationPatient`` (never by file name); ``RescaleSlope``/``RescaleIntercept``
    turn stored values into HU; the LPS patient frame is converted to RAS.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    if isinstance(source, list):
        files = [Path(p) for p in source]
        folder = files[0].parent if files else Path(".")
    else:
        folder = Path(source)
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise VolumeError(f"{folder}: DICOM folder holds no files")
    slices = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f))
        except (InvalidDicomError, OSError, EOFError) as exc:
            raise VolumeError(f"{f}: not a readable DICOM file ({exc})") from None
        if "PixelData" not in ds:
            continue
        slices.append((f, ds))
    if not slices:
        raise VolumeError(f"{folder}: no DICOM file with pixel data")
    modality = {str(getattr(ds, "Modality", "")) for _, ds in slices}
    if modality != {"CT"}:
        raise VolumeError(f"{folder}: modality {sorted(modality)} is not CT")
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in slices}
    if len(series) > 1:
        raise VolumeError(f"{folder}: holds {len(series)} series; give one series per folder")
    orient = np.asarray(slices[0][1].ImageOrientationPatient, dtype=np.float64)
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    slices.sort(
        key=lambda item: float(np.dot(normal, np.asarray(item[1].ImagePositionPatient, float)))
    )
    planes = []
    for f, ds in slices:
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:  # pydicom raises many types for broken pixel data
            raise VolumeError(f"{f}: pixel data unreadable ({exc})") from None
        slope = float(getattr(ds, "RescaleSlope", 1.0))
        intercept = float(getattr(ds, "RescaleIntercept", 0.0))
        planes.append(pixels * slope + intercept)
    if len({p.shape for p in planes}) != 1:
        raise VolumeError(f"{folder}: slices have different sizes")
    # pixel_array is [row, column]; store as [column (x-ish), row (y-ish), slice]
    hu = np.stack([p.T for p in planes], axis=-1)
    first = np.asarray(slices[0][1].ImagePositionPatient, dtype=np.float64)
    row_spacing, col_spacing = (float(v) for v in slices[0][1].PixelSpacing)
    if len(slices) > 1:
        last = np.asarray(slices[-1][1].ImagePositionPatient, dtype=np.float64)
        step = (last - first) / (len(slices) - 1)
    else:
        step = normal * float(getattr(slices[0][1], "SliceThickness", 1.0) or 1.0)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_spacing
    affine_lps[:3, 1] = col_dir * row_spacing
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = first
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps
    return Volume(hu.astype(np.float32), affine, str(folder))


def read_volume(path: str | Path) -> Volume:
    """Read a NIfTI file or a DICOM series folder; check it is a finite 3D volume."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: file not found")
    if path.is_dir():
        volume = read_dicom_series(path)
    else:
        if path.stat().st_size == 0:
            raise VolumeError(f"{path}: file is empty (0 bytes)")
        if path.name.endswith((".nii", ".nii.gz")):
            volume = read_nifti(path)
        elif path.suffix.lower() == ".dcm":
            volume = read_dicom_series([path])
        else:
            raise VolumeError(
                f"{path}: unknown volume format (expected .nii, .nii.gz or a DICOM folder)"
            )
    finite = np.isfinite(volume.hu)
    if not finite.all():
        raise VolumeError(f"{path}: {int((~finite).sum())} NaN/inf voxels")
    return volume


def write_dicom_series(
    folder: str | Path,
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    intercept: float = -1024.0,
    file_order: list[int] | None = None,
    modality: str = "CT",
    synthetic: str | None = None,
) -> list[Path]:
    """Write a RAS-ordered HU volume as a single-frame DICOM series (one file per slice).

    Stored values are ``round(HU - intercept)`` as uint16. ``file_order`` permutes which file
    name each slice gets (readers must sort by position, not name). ``synthetic``: the series
    is marked as generated (ImageType DERIVED\\SECONDARY, series description "SYNTHETIC CT
    (synthct)", this text, e.g. the generator and its sha256, as its derivation description;
    no patient name or ID), for synthetic cohorts.
    """
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = hu.shape
    # RAS array -> LPS patient frame: the DICOM row direction is +x_LPS (= -x_RAS)
    lps = np.asarray(hu)[::-1, ::-1, :]
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    origin_ras = -np.asarray(spacing) * (np.asarray(hu.shape) - 1) / 2.0
    origin_lps = np.array(
        [
            -(origin_ras[0] + (nx - 1) * spacing[0]),
            -(origin_ras[1] + (ny - 1) * spacing[1]),
            origin_ras[2],
        ]
    )
    names = list(range(nz)) if file_order is None else list(file_order)
    written = []
    for k in range(nz):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"slice_{names[k]:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = (
            series_uid,
            study_uid,
            frame_uid,
        )
        if synthetic is None:
            ds.PatientID = "PHANTOM"
        else:  # generated, not acquired: say so, and carry no patient identity at all
            ds.PatientID, ds.PatientName = "", ""
            ds.ImageType = ["DERIVED", "SECONDARY"]
            ds.SeriesDescription = "SYNTHETIC CT (synthct)"
            ds.Manufacturer = "synthct"
            ds.BurnedInAnnotation = "NO"
            ds.DerivationDescription = synthetic[:1024]
        ds.InstanceNumber = int(names[k]) + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [
            float(origin_lps[0]),
            float(origin_lps[1]),
            float(origin_lps[2] + k * spacing[2]),
        ]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = float(intercept), 1.0
        stored = np.clip(np.round(lps[:, :, k] - intercept), 0, 65535).astype(np.uint16)
        ds.PixelData = stored.T.copy().tobytes()  # DICOM rows run along y
        pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
        written.append(path)
    return written
