"""``python -m tools datalist``: the command-line face of ``common.data.datalist.build_datalist``."""

from __future__ import annotations

from common.errors import fail


def datalist(
    root: str,
    out: str = "datalist.json",
    folds: int = 5,
    seed: int = 0,
    val_fold: int = 0,
    layout: str = "auto",
    check: str = "full",
    label_scheme: str | None = None,
    require_label: bool = True,
    progress: bool = True,
) -> str:
    """Detect a dataset's layout, validate every case and write a datalist with cross-validation folds.

    Nothing is written if any case is broken: every problem of every case is listed (case, file, problem).
    Layouts: BraTS 2019/2020/2021/2023/2024 as released, MSD Task01_BrainTumour, or generic (one folder per case,
    files named after their contrast: t1n|t1|t1w, t1c|t1ce|t1gd, t2w|t2, t2f|flair, seg|label|mask).
    Grades (for stratified folds) come from the HGG/LGG folders (2019), name_mapping.csv (2020) or grades.csv.

    Args:
        root: dataset folder (or a folder wrapping it, as unpacked from a download).
        out: datalist JSON to write; its item paths are relative to its folder.
        folds: number of cross-validation folds (deterministic for a seed; stratified by HGG/LGG when known).
        seed: random seed of the fold assignment.
        val_fold: fold that goes to "validation" (the others to "training"); -1 puts every case in "training".
        layout: auto | brats2019 | brats2020 | brats2021 | brats2023 | brats2024 | msd | generic.
        check: full (read every voxel: NaN/Inf, empty images, label values) | quick (headers only).
        label_scheme: override the layout's label scheme (brats2019, brats2023, brats2024, msd, six_label).
        require_label: a case without a segmentation is an error (False: its label is null).
        progress: show a progress bar over the cases.
    Returns:
        The path of the written datalist.
    """
    import sys

    from common.data.datalist import build_datalist
    from common.io import DataError

    try:
        data = build_datalist(
            root, out, folds=folds, seed=seed, val_fold=val_fold, layout=layout, check=check,
            label_scheme=label_scheme, require_label=require_label, progress=progress,
        )
    except DataError as err:
        fail(err, "nothing written")
    n_train, n_val = len(data["training"]), len(data["validation"])
    print(
        f"{data['layout']} dataset ({data['label_scheme']} labels): {n_train} training + {n_val} validation cases "
        f"(fold {data['val_fold']} of {folds}) -> {out}",
        file=sys.stderr,
    )
    return str(out)
