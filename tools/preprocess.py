"""``python -m tools preprocess``: FeTS/BraTS-style preprocessing of raw multi-contrast scans."""

from __future__ import annotations

from common.errors import fail

import sys


def preprocess(
    input: str,
    output: str,
    layout: str | None = None,
    reference: str = "t1c",
    atlas: str | None = None,
    atlas_mask: str | None = None,
    spacing: float = 1.0,
    skull_strip: str = "auto",
    normalisation: str = "none",
    n4: bool = True,
    n4_resolution_mm: float = 4.0,
    crop: bool = True,
    workers: int = 1,
    shard: str | None = None,
    overwrite: bool = False,
    qc: bool = True,
    threads: int | None = None,
    hdbet_device: str | None = None,
):
    """Reorient, N4-correct, co-register every contrast to the reference, register it to an atlas, skull-strip,
    resample to `spacing` mm in atlas space, crop to the brain and normalise; writes a BraTS 2023 layout.

    Each case gets `<output>/<case>/preprocess.json` (transforms, settings, quality numbers; written last) and
    `<output>/qc/<case>.png` (middle slices of every contrast, brain mask outlined). A rerun skips cases already
    finished with the same settings. Bad cases are reported by name at the end; the exit status is then 1.

    Args:
        input: raw dataset folder (BraTS 2019-2024, MSD, or generic: one folder per case, contrasts by file name).
        output: output folder (BraTS 2023 layout; BraTS 2024 when the labels include a resection cavity).
        layout: input layout name; default: detected.
        reference: contrast registered to the atlas, the others are registered to it (t1n, t1c, t2w or t2f).
        atlas: atlas T1 NIfTI; default: MNI152 2009c from nilearn (1 mm, skull-stripped, works offline).
        atlas_mask: brain mask of a custom atlas (required when the atlas keeps the skull).
        spacing: output voxel size in mm.
        skull_strip: auto (HD-BET if installed with weights, else atlas), atlas (weight-free), hdbet, none.
        normalisation: none, zscore (non-zero brain voxels) or percentile (0.5-99.5 % -> [0, 1]).
        n4: N4 bias-field correction.
        n4_resolution_mm: N4 fits the bias field on a copy shrunk to about this voxel size (larger: faster).
        crop: crop to the brain's bounding box (+2 voxels).
        workers: cases processed in parallel (processes).
        shard: i/n, 0-based: process every n-th case of the sorted list starting at i (cluster array jobs).
        overwrite: redo cases that are already finished.
        qc: write the QC montage of each case.
        threads: SimpleITK threads per worker; default: CPU cores / workers.
        hdbet_device: device for HD-BET (cuda, cpu); default: cuda when available.
    """
    from common.preprocess.pipeline import PreprocessConfig
    from common.preprocess.runner import preprocess_dataset

    config = PreprocessConfig(
        reference=reference, atlas=atlas, atlas_mask=atlas_mask, spacing=float(spacing), n4=bool(n4),
        n4_resolution_mm=float(n4_resolution_mm),
        skull_strip=skull_strip, crop=bool(crop), normalisation=normalisation,
    )
    try:
        summary = preprocess_dataset(
            input, output, config=config, layout=layout, workers=int(workers), shard=shard,
            overwrite=bool(overwrite), qc=bool(qc), hdbet_device=hdbet_device, threads=threads,
        )
    except (ValueError, RuntimeError) as exc:  # DataError, bad flags, HD-BET unavailable: one clear line
        fail(exc)
    print(summary.report())
    if not summary.ok:
        sys.exit(1)
