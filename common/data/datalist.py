"""Validated datalists with cross-validation folds, in the project's canonical JSON format.

``{"layout", "label_scheme", "root", "folds", "seed", "val_fold", "training": [items], "validation": [items]}``;
an item is ``{"id", "t1n", "t1c", "t2w", "t2f", "label", "grade", "fold"}`` (msd items add ``<contrast>_channel``)
with paths relative to the datalist file's folder, so MONAI's ``load_decathlon_datalist`` and
``load_datalist`` here both resolve them.

Nothing is written unless every case passes validation; all problems of all cases are reported together.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from common import CONTRASTS
from common.data.labels import check_labels, get_scheme
from common.data.layouts import detect_layout, get_layout, layout_label_scheme, read_layout, unread_folders
from common.errors import warn
from common.io import DataError, check_output, load_nifti, open_nifti, save_json

CHECKS = ("full", "quick")
AFFINE_ATOL = 1e-3  # mm / direction-cosine units: co-registered BraTS files share their affine bit for bit
PATH_KEYS = CONTRASTS + ("label",)


# ----------------------------------------------------------------------------------------------- validation


def _header_only(path: Path):
    """(shape, affine, header) from the header alone, for ``check="quick"``."""
    img = open_nifti(path)
    return None, tuple(int(s) for s in img.shape), np.asarray(img.affine), img.header


def _load(path: Path, quick: bool, dtype=np.float32):
    if quick:
        return _header_only(path)
    data, affine, header = load_nifti(path, dtype=dtype)
    return data, data.shape, np.asarray(affine), header


IMPLAUSIBLE_INTENSITY = 1e6  # no MR scanner or BraTS release stores values near this; z-scoring them overflows


def _header_warning(header) -> str | None:
    """qform and sform that disagree: nibabel and MONAI read the sform, ITK-based tools the qform."""
    qform, qcode = header.get_qform(coded=True)
    sform, scode = header.get_sform(coded=True)
    if qcode > 0 and scode > 0 and not np.allclose(qform, sform, atol=1e-3):
        return (f"qform and sform disagree by up to {float(np.abs(qform - sform).max()):.3g} mm; nibabel and MONAI "
                "use the sform, ITK-based tools the qform: fix the header")
    return None


def case_problems(item: dict, scheme: str, check: str = "full", warnings: list | None = None) -> list[DataError]:
    """Every problem of one case as ``DataError``s naming the case and the file (empty list: the case is fine).

    ``check="quick"`` reads headers only (existence, readability, shapes, affines); ``"full"`` also reads the
    voxels (NaN/Inf, all-zero images, label values outside ``scheme``). ``warnings`` collects ``(file, problem)``
    for what can be processed but may be wrong: disagreeing qform/sform, implausible intensities (full check).
    """
    if check not in CHECKS:
        raise DataError("--check", f"must be one of {CHECKS}, got {check!r}")
    quick = check == "quick"
    case = item.get("id", "?")
    scheme = get_scheme(scheme)
    problems: list[DataError] = []

    def fail(path, problem):
        problems.append(DataError(f"case {case}: {path}", problem))

    for p in item.get("problems", []):
        problems.append(DataError(f"case {case}: {p.where}", p.problem))

    loaded: dict[str, tuple] = {}  # key -> (spatial shape, affine, path)
    cache: dict[str, tuple | DataError] = {}  # one read per file (msd: four contrasts share one file)
    for key in PATH_KEYS:
        path = item.get(key)
        if path is None:
            if key != "label" and not item.get("problems"):  # generic readers already said why
                fail("(no file)", f"missing contrast {key}")
            continue
        path = Path(path)
        channel = item.get(f"{key}_channel")
        first_use = str(path) not in cache
        if first_use:
            try:
                cache[str(path)] = _load(path, quick)
            except DataError as err:
                cache[str(path)] = err
        result = cache[str(path)]
        if isinstance(result, DataError):
            if first_use:
                fail(result.where, f"{key}: {result.problem}")
            continue
        data, shape, affine, header = result
        if warnings is not None and first_use:
            note = _header_warning(header)
            if note:
                warnings.append((str(path), note))
            if data is not None and key != "label" and data.size:
                peak = float(np.abs(data).max())
                if peak > IMPLAUSIBLE_INTENSITY:
                    warnings.append((str(path), f"implausible intensities (max |value| {peak:.3g}); normalising in "
                                                "float32 may overflow: check the scaling"))
        if channel is not None:
            if len(shape) != 4 or shape[3] <= channel:
                fail(path, f"{key} should be channel {channel} of a 4-D image, but the image has shape {shape}")
                continue
            shape = shape[:3]
            data = None if data is None else data[..., channel]
        elif len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
            fail(path, f"{key} must be a 3-D volume, has shape {shape}")
            continue
        shape = tuple(shape[:3])
        if data is not None:
            data = data.reshape(shape)
            if key == "label":
                try:
                    check_labels(data, scheme, where=path)
                except DataError as err:
                    fail(path, f"label: {err.problem}")
            elif not np.any(data):
                fail(path, f"{key} image is all zeros" + (f" (channel {channel})" if channel is not None else ""))
        loaded[key] = (shape, affine, path)

    if loaded:
        ref_key = next(iter(loaded))
        ref_shape, ref_affine, ref_path = loaded[ref_key]
        for key, (shape, affine, path) in loaded.items():
            if key == ref_key:
                continue
            if shape != ref_shape:
                fail(path, f"{key} has shape {shape} but {ref_key} ({Path(ref_path).name}) has {ref_shape}")
            elif not np.allclose(affine, ref_affine, rtol=0, atol=AFFINE_ATOL):
                diff = float(np.abs(affine - ref_affine).max())
                fail(
                    path,
                    f"{key} affine differs from {ref_key}'s ({Path(ref_path).name}) by up to {diff:.4g} "
                    f"(tolerance {AFFINE_ATOL}); the images are not co-registered on one grid",
                )
    return problems


def validate_case(item: dict, scheme: str, check: str = "full") -> None:
    """Raise one ``DataError`` listing every problem of the case (naming case and file); return if it is fine."""
    problems = case_problems(item, scheme, check)
    if problems:
        raise DataError(f"case {item.get('id', '?')}", _format(problems))


def _format(problems: list[DataError]) -> str:
    return f"{len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)


def validate_items(items: list[dict], scheme: str, check: str = "full", progress: bool = True,
                   warnings: list | None = None) -> None:
    """Validate every case; raise one ``DataError`` with all problems of all cases (``warnings``: see
    :func:`case_problems`)."""
    from tqdm.auto import tqdm

    problems: list[DataError] = []
    bad_cases = 0
    for item in tqdm(items, desc=f"validating ({check})", unit="case", disable=not progress):
        found = case_problems(item, scheme, check, warnings)
        problems += found
        bad_cases += bool(found)
    if problems:
        raise DataError(f"{bad_cases} of {len(items)} case(s)", _format(problems))


# ----------------------------------------------------------------------------------------------- folds


def assign_folds(items: list[dict], folds: int, seed: int = 0, stratify: bool = True) -> list[int]:
    """Fold index per item: deterministic for (case ids, seed), balanced, stratified by ``grade`` if known.

    Cases are ordered by id before shuffling, so the input order and the file system do not matter. Within each
    grade group the shuffled cases are dealt round-robin, continuing where the previous group stopped, so fold
    sizes differ by at most one.
    """
    if folds < 1:
        raise DataError("--folds", f"must be >= 1, got {folds}")
    rng = np.random.default_rng(seed)
    groups: dict[Any, list[int]] = defaultdict(list)
    order = sorted(range(len(items)), key=lambda i: str(items[i]["id"]))
    for i in order:
        groups[items[i].get("grade") if stratify else None].append(i)
    assignment = [0] * len(items)
    position = 0
    for key in sorted(groups, key=lambda g: (g is None, str(g))):
        members = groups[key]
        for i in rng.permutation(len(members)):
            assignment[members[i]] = position % folds
            position += 1
    return assignment


# ----------------------------------------------------------------------------------------------- datalists


def _relative(path: str | None, base: Path) -> str | None:
    return None if path is None else os.path.relpath(Path(path).resolve(), base)


def build_datalist(
    root,
    out,
    folds: int = 5,
    seed: int = 0,
    val_fold: int | None = 0,
    layout: str = "auto",
    check: str = "full",
    label_scheme: str | None = None,
    require_label: bool = True,
    progress: bool = True,
) -> dict:
    """Detect, read and validate the dataset at ``root``, assign folds, write ``out``; returns the datalist.

    ``val_fold=None`` (or -1) puts every case in ``training``. ``label_scheme`` overrides the layout's (e.g. a
    generic dataset labelled the BraTS 2019 way). Raises ``DataError`` listing all problems; then nothing is written.
    """
    # every flag and the output path first: validating a large dataset takes minutes
    if int(folds) < 1:
        raise DataError("--folds", f"must be >= 1, got {folds}")
    if val_fold is not None and val_fold < 0:
        val_fold = None
    if val_fold is not None and not 0 <= val_fold < folds:
        raise DataError("--val_fold", f"must be in [0, {folds}) for {folds} folds, got {val_fold}")
    if check not in CHECKS:
        raise DataError("--check", f"must be one of {', '.join(CHECKS)}, got {check!r}")
    if layout not in (None, "auto"):
        get_layout(layout)
    if label_scheme is not None:
        get_scheme(label_scheme)
    out = check_output(out, "file", flag="out").resolve()
    root = Path(root).resolve()
    layout = detect_layout(root) if layout in (None, "auto") else layout
    scheme = get_scheme(label_scheme or layout_label_scheme(root, layout)).name
    items = read_layout(root, layout, require_label=require_label)
    found: list[tuple[str, str]] = []
    validate_items(items, scheme, check, progress, warnings=found)
    if len(items) < folds:
        raise DataError(root, f"only {len(items)} case(s) for {folds} folds; use fewer folds")
    notes: list[str] = []  # printed now and kept in the datalist: processed, but maybe not what was meant
    for folder in unread_folders(root, layout, items):
        warn(folder, f"folder name does not match the {layout} case pattern; not in the datalist (rename it)", notes)
    for where, problem in found:
        warn(where, problem, notes)

    base = out.parent
    fold_of = assign_folds(items, folds, seed)
    training, validation = [], []
    for item, fold in zip(items, fold_of):
        entry = {k: v for k, v in item.items() if k != "problems"}
        for key in PATH_KEYS:
            entry[key] = _relative(entry.get(key), base)
        entry["fold"] = fold
        (validation if fold == val_fold else training).append(entry)
    datalist = {
        "layout": layout,
        "label_scheme": scheme,
        "root": os.path.relpath(root, base),
        "folds": folds,
        "seed": seed,
        "val_fold": val_fold,
        "check": check,
        "warnings": notes,
        "training": training,
        "validation": validation,
    }
    save_json(datalist, out)
    return datalist


def read_datalist_json(path) -> dict:
    """A datalist file's JSON object, or a refusal naming the file (missing, unreadable, not JSON, not an object)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "datalist file does not exist" if not path.exists() else "is not a file")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"unreadable datalist JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(path, f"a datalist is a JSON object with 'training'/'validation' lists, got {type(data).__name__}")
    return data


def load_datalist(path, sections: str | Iterable[str] = ("training", "validation")) -> list[dict]:
    """Items of ``sections`` with absolute paths (resolved against the datalist's folder)."""
    path = Path(path)
    data = read_datalist_json(path)
    if isinstance(sections, str):
        sections = (sections,)
    base = path.resolve().parent
    items = []
    for section in sections:
        if section not in data:
            present = sorted(k for k, v in data.items() if isinstance(v, list))
            raise DataError(path, f"no section {section!r} (has {present})")
        for item in data[section]:
            item = dict(item)
            for key in PATH_KEYS:
                if item.get(key) is not None:
                    item[key] = str((base / item[key]).resolve())
            items.append(item)
    return items


def datalist_info(path) -> dict:
    """The datalist's header (layout, label_scheme, folds, ...) without the item lists."""
    data = read_datalist_json(path)
    return {k: v for k, v in data.items() if not isinstance(v, list)}
