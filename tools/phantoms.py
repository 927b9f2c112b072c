"""``python -m tools phantoms``: write physics-based brain-tumour phantoms in a BraTS layout."""

from __future__ import annotations

from collections import Counter


def _parse_shape(shape):
    from common.io import DataError
    from common.phantom import DEFAULT_SHAPE, SMALL_SHAPE

    if shape is None or shape == "" or shape == "full":
        return DEFAULT_SHAPE
    if isinstance(shape, str):
        if shape.strip().lower() == "small":
            return SMALL_SHAPE
        parts = [p for p in shape.replace("x", ",").split(",") if p.strip()]
    else:
        parts = list(shape)
    try:
        out = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise DataError("--shape", f"must be 'small', 'full' or three integers like 240,240,155; got {shape!r}") from None
    if len(out) != 3:
        raise DataError("--shape", f"must have three sizes, got {shape!r}")
    return out


def phantoms(out, n: int = 10, layout: str = "brats2023", seed: int = 0, shape=None, workers: int | None = None):
    """Write N phantom cases that look like a BraTS release (embedded default data; no download needed).

    Anatomy comes from the MNI152 templates inside the nilearn wheel (plus CSF, skull and scalp); 1-3 gliomas
    per case with BraTS compartments and mass effect; t1n/t1c/t2w/t2f from MR signal equations at 3 T with bias
    field and Rician noise. Case i is the same for a given seed whatever n or workers.

    Args:
        out: output folder (created if needed).
        n: number of cases.
        layout: brats2019 | brats2020 | brats2021 | brats2023 | brats2024 (post-treatment, resection cavities).
        seed: global seed; per-case seeds derive from it.
        shape: voxels covering the 240x240x155 mm field of view: "240,240,155" (default, 1 mm), "small"
            (96,96,64), or any "X,Y,Z".
        workers: parallel processes (default: one per CPU core, at most n).
    """
    from common.phantom import make_phantoms
    from common.phantom import case_seed, default_grade

    grid = _parse_shape(shape)
    paths = make_phantoms(out, n=n, layout=layout, seed=seed, shape=grid, workers=workers, progress=True)
    grades = Counter(default_grade(case_seed(seed, i)) for i in range(int(n)))
    print(f"wrote {len(paths)} {layout} phantom cases ({'x'.join(map(str, grid))} voxels) to {out}")
    print("grades: " + ", ".join(f"{g} {grades.get(g, 0)}" for g in ("HGG", "LGG")))
