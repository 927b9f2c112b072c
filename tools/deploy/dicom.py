"""DICOM MR series <-> NIfTI volume, geometry exact both ways (no MONAI Deploy SDK needed: pydicom only).

A series is read into a RAS NIfTI (what the bundles read) and a synthesised volume on that grid is written back as a
new series that copies each source slice's geometry, so a viewer overlays it on the acquired series exactly.
"""

from __future__ import annotations

import copy
import datetime
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.io import DataError

# what each imputation writes back, in the words a reading room sees first (SeriesDescription: 64 characters at most)
SYNTHETIC_SERIES = {
    "impute_flair": ("t2f", "SYNTHETIC FLAIR (cGAN from T2) - not for diagnosis"),
    "impute_t1": ("t1n", "SYNTHETIC T1 (cGAN from T1c) - not for diagnosis"),
}
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# acquisition parameters of the source sequence: wrong for a synthesised contrast, so they are not copied
_ACQUISITION_TAGS = ("EchoTime", "RepetitionTime", "InversionTime", "FlipAngle", "EchoTrainLength", "SequenceName",
                     "ScanningSequence", "SequenceVariant", "ScanOptions", "ProtocolName", "ContrastBolusAgent",
                     "WindowCenterWidthExplanation", "SmallestImagePixelValue", "LargestImagePixelValue",
                     "ImageComments", "AcquisitionNumber")


@dataclass
class Series:
    """The source slices (sorted along the slice normal), the volume (x=column, y=row, z=slice) and its RAS affine."""

    slices: list
    volume: np.ndarray
    affine: np.ndarray
    folder: Path


def _read_folder(folder: Path, headers_only: bool = False) -> list:
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not folder.is_dir():
        raise DataError(folder, "not a folder; give the folder of one DICOM series")
    found = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=headers_only)
        except (InvalidDicomError, OSError):
            continue  # DICOMDIR-less folders often hold other files (README, thumbnails)
        if (headers_only or "PixelData" in ds) and "ImagePositionPatient" in ds:
            found.append(ds)
    if not found:
        raise DataError(folder, "no DICOM image with ImagePositionPatient in this folder (is it a DICOM series?)")
    return found


def check_series_folder(folder: str | os.PathLike) -> Path:
    """A folder holding DICOM images with a position (headers only: the quick check before the app starts)."""
    folder = Path(folder).resolve()
    _read_folder(folder, headers_only=True)
    return folder


def read_series(folder: str | os.PathLike) -> Series:
    """Read one MR series: slices sorted by ImagePositionPatient along the normal, LPS geometry turned into RAS.

    Refuses (``DataError``) several series in one folder, tilted or missing orientation, and uneven slice steps:
    each would give a wrong affine, so a silently misplaced synthetic image.
    """
    folder = Path(folder)
    slices = _read_folder(folder)
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in slices}
    if len(uids) > 1:
        raise DataError(folder, f"holds {len(uids)} series ({', '.join(sorted(uids))}); give the folder of one")
    iop = np.array([float(v) for v in slices[0].ImageOrientationPatient])
    for ds in slices:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], iop, atol=1e-4):
            raise DataError(folder, "slices have different ImageOrientationPatient (not one stack)")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda ds: float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in slices])
    if len(slices) > 1:
        steps = np.diff(positions, axis=0)
        step = steps.mean(axis=0)
        if np.linalg.norm(step) < 1e-6 or not np.allclose(steps, step, atol=1e-3 * max(1.0, np.linalg.norm(step))):
            raise DataError(folder, "slice positions are duplicated or unevenly spaced; cannot build one volume")
    else:
        step = normal * float(slices[0].get("SliceThickness", 1.0))
    shape = {(int(ds.Rows), int(ds.Columns)) for ds in slices}
    if len(shape) > 1:
        raise DataError(folder, f"slices have different sizes {sorted(shape)}")
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)  # between rows, between columns
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing  # x: along a row (column index)
    lps[:3, 1] = col_dir * row_spacing  # y: down a column (row index)
    lps[:3, 2] = step
    lps[:3, 3] = positions[0]
    volume = np.stack([_real_values(ds).T for ds in slices], axis=-1).astype(np.float32)
    return Series(slices, volume, LPS_TO_RAS @ lps, folder)


def _real_values(ds) -> np.ndarray:
    slope, intercept = float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    return ds.pixel_array.astype(np.float64) * slope + intercept


def write_nifti(series: Series, path: str | os.PathLike) -> Path:
    """The series as a float32 NIfTI (atomic), qform/sform set to the RAS affine."""
    from common.io import save_nifti

    return save_nifti(series.volume, series.affine, path, dtype=np.float32)


def _uint16_scaling(volume: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Stored values 0..65535 and (slope, intercept) that give the real values back to within 1/65535 of the range."""
    lo, hi = float(volume.min()), float(volume.max())
    slope = (hi - lo) / 65535.0 if hi > lo else 1.0
    stored = np.clip(np.rint((volume - lo) / slope), 0, 65535).astype(np.uint16)
    return stored, slope, lo


def write_series(series: Series, volume: np.ndarray, out_dir: str | os.PathLike, description: str,
                 derivation: str, series_number_offset: int = 1000) -> Path:
    """Write ``volume`` (on ``series``'s grid) as a new DERIVED\\SECONDARY series in ``out_dir``, atomically.

    Each output slice copies its source slice's patient/study/geometry attributes (ImagePositionPatient,
    ImageOrientationPatient, PixelSpacing, SliceThickness, FrameOfReferenceUID) and references it in
    SourceImageSequence; new SeriesInstanceUID and SOPInstanceUIDs; uint16 pixels with RescaleSlope/Intercept and a
    window over the 1st..99th percentile. The folder appears complete or not at all.
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if volume.shape != series.volume.shape:
        raise ValueError(f"synthesised volume {volume.shape} is not on the series grid {series.volume.shape}")
    if not np.isfinite(volume).all():
        raise ValueError("synthesised volume has NaN/Inf voxels")
    out_dir = Path(out_dir)
    stored, slope, intercept = _uint16_scaling(volume)
    p1, p99 = np.percentile(volume[volume > volume.min()] if (volume > volume.min()).any() else volume, [1, 99])
    series_uid = generate_uid()
    now = datetime.datetime.now()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for k, src in enumerate(series.slices):
            ds = copy.deepcopy(src)
            for tag in _ACQUISITION_TAGS:
                if tag in ds:
                    delattr(ds, tag)
            ds.remove_private_tags()
            sop_uid = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.SOPInstanceUID = sop_uid
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = int(src.get("SeriesNumber", 0) or 0) + series_number_offset
            ds.InstanceNumber = k + 1
            ds.SeriesDescription = description[:64]
            ds.ImageType = ["DERIVED", "SECONDARY"]
            ds.DerivationDescription = derivation[:1024]
            ds.BurnedInAnnotation = "NO"
            ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
            ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
            ref = Dataset()
            ref.ReferencedSOPClassUID = src.SOPClassUID
            ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
            ds.SourceImageSequence = Sequence([ref])
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:.10g}", f"{intercept:.10g}", "US"
            ds.WindowCenter, ds.WindowWidth = f"{(p1 + p99) / 2:.6g}", f"{max(p99 - p1, 1e-6):.6g}"
            pixels = np.ascontiguousarray(stored[:, :, k].T)  # back to (rows, columns)
            ds.Rows, ds.Columns = pixels.shape
            ds.PixelData = pixels.tobytes()
            ds["PixelData"].VR = "OW"
            ds.save_as(tmp / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
