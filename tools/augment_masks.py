"""``python -m tools augment-masks``: N plausible new 6-label masks per real mask (GliomaGen's mask augmentation)."""

from __future__ import annotations

from common.errors import fail


def augment_masks(
    masks: str,
    out: str,
    n: int = 2,
    seed: int = 0,
    scheme: str = "six_label",
    threshold: float = 0.0,
    margin: int = 2,
    max_tries: int = 20,
    previews: bool = True,
    progress: bool = True,
    workers: int = 1,
) -> str:
    """Write ``n`` augmentations of every mask: flips, affine and elastic deformation (MONAI, nearest), tumor
    translation and resizing inside the head, edema growth/shrinkage; each cleaned and validity-checked.

    Every written mask passes ``common.gliomagen.masks.check_mask`` (tumor inside the head with a margin,
    compartments nested as in BraTS, no holes in the head, no stray voxels); rejected draws are redrawn and
    counted in ``augment_masks.json``. ``previews/<id>.png`` shows each original next to its augmentations.
    A bad input mask (unreadable, not 3-D, labels outside the scheme, no head, tumor outside the head) stops the
    command before anything is written, naming every bad file.

    Args:
        masks: 6-label masks (a NIfTI, a folder or a datalist); with ``--scheme`` other than six_label, a dataset
            folder (any layout) whose head label is derived from each case's images.
        out: output folder: ``<id>-seg.nii.gz`` per new mask (BraTS ids get an ``AUGxx`` suffix on their
            prefix, e.g. ``BraTS-GLIAUGAA-02000-100``), on the source mask's affine and header.
        n: new masks per source mask (the paper: 2).
        seed: random seed (each draw's seed depends on it, the case id and the draw).
        scheme: label scheme of the inputs (six_label, or a dataset's: brats2024, brats2023, ...).
        threshold: with a dataset: image intensity above which a voxel is head (0 for skull-stripped BraTS).
        margin: minimum depth (voxels) of the tumor inside the head (relaxed to the source's own depth).
        max_tries: draws per requested mask before giving up on it (counted as failed).
        previews: write the preview pictures.
        progress: show a progress bar.
        workers: processes sharing the masks (the files do not depend on it).
    Returns:
        The path of the summary JSON.
    """
    import json
    import sys
    from pathlib import Path

    from common.gliomagen.masks import AugmentConfig, augment_masks as run
    from common.io import DataError

    try:
        summary = run(masks, out, n=n, seed=seed, scheme=scheme, threshold=threshold, previews=previews,
                      progress=progress, workers=workers, config=AugmentConfig(margin=margin, max_tries=max_tries))
    except DataError as err:
        fail(err)
    print(json.dumps({k: summary[k] for k in ("written", "rejected", "failed")}), file=sys.stderr)
    return str(Path(out) / "augment_masks.json")
