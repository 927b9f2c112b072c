"""``python -m tools score-segmentation``: GliomaGen's downstream segmentation table for one model's predictions."""

from __future__ import annotations

from common.errors import fail


def score_segmentation(
    pred: str, ref: str, out: str | None = None, scheme: str = "brats2024", title: str = "model",
    progress: bool = True,
) -> str:
    """Score predicted label maps against the references: Cohen's kappa, accuracy, F1 per label, average Dice,
    Pearson r of volumes, HD95 and ASSD (mm), as in the paper's Fig. 13/14 (definitions:
    ``common.gliomagen.scores``).

    Args:
        pred: folder of predicted label files (e.g. nnU-Net's output ``<case>.nii.gz``).
        ref: folder of reference labels (nnU-Net ``labelsTs`` or a BraTS dataset's ``-seg`` files).
        out: folder for ``scores.json`` (summary + per case) and ``scores.md``; nothing written when omitted.
        scheme: label scheme of both (brats2024: 1 NETC, 2 SNFH, 3 ET, 4 RC).
        title: the model's name in the table.
        progress: show a progress bar.
    Returns:
        The Markdown table.
    """
    from pathlib import Path

    from common.gliomagen.scores import markdown_table, score_folders
    from common.io import DataError, save_json
    from common.metrics.report import save_text

    try:
        result = score_folders(pred, ref, scheme=scheme, progress=progress)
    except DataError as err:
        fail(err)
    table = markdown_table(result["summary"], title)
    if out:
        save_json(result, Path(out) / "scores.json")
        save_text(table, Path(out) / "scores.md")
    return table
