"""Dataset folder layouts (BraTS 2019-2024, MSD Task01, generic): write cases, detect a layout, read cases.

Every reader returns *canonical items*: ``{"id", "t1n", "t1c", "t2w", "t2f", "label", "grade"}`` with absolute
paths (``label`` is ``None`` when absent and not required; ``grade`` is ``"HGG"``, ``"LGG"`` or ``None``).

MSD stores the four contrasts in one 4-D file (channels FLAIR, T1w, T1gd, T2w); its items point every contrast
key at that file and add ``<contrast>_channel`` integer keys (e.g. ``"t2f_channel": 0``).
``common.data.transforms.LoadCanonicald`` understands both forms.

Readers are lenient on purpose: a missing file appears as its expected path (or ``None`` when a generic case has
no file for a contrast, with the reason under ``"problems"``) so ``common.data.datalist`` can report every
problem of every case at once.

Grades: ``brats2019`` -> the HGG/LGG folder; ``brats2020`` -> ``name_mapping.csv`` (``Grade`` column); every
other layout -> an optional ``grades.csv`` (``case_id,grade``) at the root, written by ``write_case``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from common import CONTRASTS
from common.io import DataError, atomic_path, save_json, save_nifti
from common.data.labels import convert_labels, get_scheme

GRADES = ("HGG", "LGG")
GRADES_CSV = "grades.csv"
GENERIC_SCHEME_FILE = "labels.json"
NIFTI_SUFFIXES = (".nii.gz", ".nii")

# BraTS <= 2021 file suffixes for the canonical contrasts
OLD_BRATS_NAMES = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}
NEW_BRATS_NAMES = {c: c for c in CONTRASTS}
# MSD Task01 channel order (dataset.json "modality": FLAIR, T1w, t1gd, T2w)
MSD_CHANNELS = {"t2f": 0, "t1n": 1, "t1c": 2, "t2w": 3}
MSD_MODALITY_NAMES = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
MSD_LABEL_NAMES = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
BRATS2020_MAPPING = "name_mapping.csv"
BRATS2020_COLUMNS = (
    "Grade",
    "BraTS_2017_subject_ID",
    "BraTS_2018_subject_ID",
    "BraTS_2019_subject_ID",
    "BraTS_2020_subject_ID",
)
BRATS2019_DIR = "MICCAI_BraTS_2019_Data_Training"


@dataclass(frozen=True)
class Layout:
    name: str
    label_scheme: str
    description: str


LAYOUTS: dict[str, Layout] = {
    lay.name: lay
    for lay in (
        Layout(
            "brats2019",
            "brats2019",
            f"{BRATS2019_DIR}/{{HGG,LGG}}/BraTS19_<inst>_<n>_1/<id>_{{flair,t1,t1ce,t2,seg}}.nii.gz",
        ),
        Layout("brats2020", "brats2019", "BraTS20_Training_001/<id>_{flair,t1,t1ce,t2,seg}.nii.gz + name_mapping.csv"),
        Layout("brats2021", "brats2019", "BraTS2021_00000/<id>_{flair,t1,t1ce,t2,seg}.nii.gz"),
        Layout("brats2023", "brats2023", "BraTS-GLI-00000-000/<id>-{t1n,t1c,t2w,t2f,seg}.nii.gz"),
        Layout(
            "brats2024", "brats2024", "BraTS-GLI-02000-100/<id>-{t1n,t1c,t2w,t2f,seg}.nii.gz (post-treatment, 4 = RC)"
        ),
        Layout("msd", "msd", "imagesTr/BRATS_001.nii.gz (4-D: FLAIR, T1w, T1gd, T2w), labelsTr/, dataset.json"),
        Layout(
            "generic",
            "brats2023",
            "<case>/<files named with t1n|t1|t1w, t1c|t1ce|t1gd, t2w|t2, t2f|flair, seg|label|mask>",
        ),
    )
}

CASE_DIR_PATTERNS = {
    "brats2019": re.compile(r"^BraTS19_.+$"),
    "brats2020": re.compile(r"^BraTS20_(Training|Validation)_\d+$"),
    "brats2021": re.compile(r"^BraTS2021_\d{5}$"),
    "brats2023": re.compile(r"^BraTS-[A-Z]+-\d{5}-\d{3}$"),
}


def get_layout(name: str) -> Layout:
    key = str(name).lower()
    if key not in LAYOUTS:
        raise DataError("--layout", f"unknown layout {name!r}; choose one of {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[key]


# ----------------------------------------------------------------------------------------------- case ids


def _letters(index: int, width: int = 3) -> str:
    """0 -> AAA, 1 -> AAB, ... (the CBICA three-letter subject codes)."""
    out = ""
    for _ in range(width):
        index, rem = divmod(index, 26)
        out = chr(ord("A") + rem) + out
    return out


def make_case_id(layout: str, index: int, grade: str | None = None) -> str:
    """A realistic case id for ``layout`` (index 0-based): e.g. ``BraTS-GLI-00003-000``, ``BRATS_004``."""
    layout = get_layout(layout).name
    if index < 0:
        raise ValueError(f"case index must be >= 0, got {index}")
    if layout == "brats2019":
        # HGG cases of the real release are mostly CBICA, LGG ones TCIA
        if _normalise_grade(grade, "make_case_id") == "LGG":
            return f"BraTS19_TCIA10_{index + 100:03d}_1"
        return f"BraTS19_CBICA_{_letters(index)}_1"
    if layout == "brats2020":
        return f"BraTS20_Training_{index + 1:03d}"
    if layout == "brats2021":
        return f"BraTS2021_{index:05d}"
    if layout == "brats2023":
        return f"BraTS-GLI-{index:05d}-000"
    if layout == "brats2024":
        return f"BraTS-GLI-{index + 2000:05d}-100"
    if layout == "msd":
        return f"BRATS_{index + 1:03d}"
    return f"case_{index:04d}"


def _normalise_grade(grade: Any, where: Any) -> str | None:
    if grade is None:
        return None
    text = str(grade).strip()
    if text == "" or text.upper() in ("NA", "N/A", "NONE", "NAN", "UNKNOWN"):
        return None
    if text.upper() not in GRADES:
        raise DataError(where, f"grade {grade!r} is not one of {GRADES} (or empty)")
    return text.upper()


# ----------------------------------------------------------------------------------------------- paths


def _nifti(folder: Path, stem: str) -> Path:
    """Existing ``stem.nii.gz`` or ``stem.nii`` in ``folder``; the ``.nii.gz`` path when neither exists. Both
    present is refused: which one is the scan cannot be guessed."""
    found = [folder / f"{stem}{suffix}" for suffix in NIFTI_SUFFIXES if (folder / f"{stem}{suffix}").exists()]
    if len(found) > 1:
        raise DataError(found[1], f"and {found[0].name} are two files for one image; keep one of them")
    return found[0] if found else folder / f"{stem}.nii.gz"


def _case_files(layout: str, case_dir: Path, case_id: str, fallback: bool = True) -> dict[str, Path]:
    """Expected files of a BraTS-style case: contrast keys + ``label``.

    A missing file is replaced by the case folder's only file whose name says the same contrast (BraTS 2020's
    case 355 ships ``W39_1998.09.19_Segm.nii``); otherwise the expected path stays, for validation to report.
    """
    if layout in ("brats2019", "brats2020", "brats2021"):
        files = {c: _nifti(case_dir, f"{case_id}_{OLD_BRATS_NAMES[c]}") for c in CONTRASTS}
        files["label"] = _nifti(case_dir, f"{case_id}_seg")
    else:
        files = {c: _nifti(case_dir, f"{case_id}-{c}") for c in CONTRASTS}
        files["label"] = _nifti(case_dir, f"{case_id}-seg")
    if fallback and not all(p.exists() for p in files.values()):
        found, _ = _classify_files(case_dir)
        used = {p for p in files.values() if p.exists()}
        for key, path in files.items():
            candidates = [p for p in found.get(key, []) if p not in used]
            if not path.exists() and len(candidates) == 1:
                files[key] = candidates[0]
    return files


def _brats2019_base(root: Path) -> Path:
    return root / BRATS2019_DIR if (root / BRATS2019_DIR).is_dir() else root


# ----------------------------------------------------------------------------------------------- grade records


def _read_csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(path, f"unreadable CSV ({exc})") from exc


def _write_csv(path: Path, columns, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Exclusive lock on a folder (POSIX ``flock`` on its descriptor; no lock file left in the dataset), so that
    parallel case writers do not lose each other's rows of a shared CSV."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): writers there run one at a time
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _record_grade(path: Path, id_column: str, columns, case_id: str, grade_column: str, grade: str) -> None:
    with _folder_lock(path.parent):  # read-modify-write: phantom workers write cases of one folder at once
        rows = _read_csv(path) if path.exists() else []
        rows = [r for r in rows if r.get(id_column) != case_id]
        row = {c: "NA" for c in columns}
        row.update({id_column: case_id, grade_column: grade})
        rows.append(row)
        rows.sort(key=lambda r: r.get(id_column, ""))
        _write_csv(path, columns, rows)


def read_grades(path: Path, id_column: str = "case_id", grade_column: str = "grade") -> dict[str, str | None]:
    """``case_id -> HGG/LGG/None`` from a CSV; missing columns or unknown grades raise ``DataError``."""
    rows = _read_csv(path)
    if rows and (id_column not in rows[0] or grade_column not in rows[0]):
        raise DataError(path, f"needs columns {id_column!r} and {grade_column!r}, has {list(rows[0])}")
    return {
        r[id_column].strip(): _normalise_grade(r[grade_column], f"{path} (case {r[id_column]})")
        for r in rows
        if r.get(id_column)
    }


# ----------------------------------------------------------------------------------------------- writer


def write_case(
    root,
    layout: str,
    case_id: str,
    images: Mapping[str, np.ndarray],
    affine,
    label=None,
    label_scheme: str = "brats2024",
    grade: str | None = None,
    header=None,
    *,
    lossy: str = "error",
) -> Path:
    """Write one case in ``layout`` under ``root``; returns the case folder (msd: its 4-D image file).

    ``images`` maps the canonical contrasts (``t1n, t1c, t2w, t2f``) to 3-D arrays of one shape; ``label`` (in
    ``label_scheme``) is converted to the layout's scheme (see ``convert_labels`` for ``lossy``). Files are written
    atomically; ``grade`` is recorded where the layout keeps grades (brats2019 requires one: it is the folder).
    """
    root = Path(root)
    lay = get_layout(layout)
    missing = [c for c in CONTRASTS if c not in images]
    extra = [k for k in images if k not in CONTRASTS]
    if missing or extra:
        raise ValueError(
            f"case {case_id}: images must have exactly the keys {CONTRASTS} (missing {missing}, extra {extra})"
        )
    arrays = {c: np.asarray(images[c], dtype=np.float32) for c in CONTRASTS}
    shape = arrays[CONTRASTS[0]].shape
    for c, a in arrays.items():
        if a.ndim != 3 or a.shape != shape:
            raise ValueError(f"case {case_id}: contrast {c} has shape {a.shape}; all must be 3-D of shape {shape}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"case {case_id}: affine must be 4x4, got {affine.shape}")
    grade = _normalise_grade(grade, f"case {case_id}")
    scheme = _generic_scheme_for_write(root, label_scheme) if lay.name == "generic" else lay.label_scheme
    seg = None
    if label is not None:
        label = np.asarray(label)
        if label.shape != shape:
            raise ValueError(f"case {case_id}: label shape {label.shape} differs from the images' {shape}")
        seg = convert_labels(label, label_scheme, scheme, lossy=lossy, where=f"case {case_id} label")

    if lay.name == "msd":
        return _write_msd(root, case_id, arrays, affine, seg, grade, header)

    if lay.name == "brats2019":
        if grade is None:
            raise ValueError(f"case {case_id}: the brats2019 layout keeps the grade as the HGG/LGG folder; pass grade")
        case_dir = root / BRATS2019_DIR / grade / case_id
    else:
        case_dir = root / case_id
    if lay.name == "generic":
        files = {c: case_dir / f"{case_id}_{c}.nii.gz" for c in CONTRASTS}
        files["label"] = case_dir / f"{case_id}_seg.nii.gz"
    else:
        files = _case_files(lay.name, case_dir, case_id, fallback=False)
        files = {k: p.with_name(_strip_nifti(p.name) + ".nii.gz") for k, p in files.items()}
    for c in CONTRASTS:
        save_nifti(arrays[c], affine, files[c], header=header, dtype=np.float32)
    if seg is not None:
        save_nifti(seg, affine, files["label"], header=header, dtype=np.uint8)

    if lay.name == "brats2020":
        if grade is not None:
            _record_grade(root / BRATS2020_MAPPING, "BraTS_2020_subject_ID", BRATS2020_COLUMNS, case_id, "Grade", grade)
    elif lay.name != "brats2019" and grade is not None:
        _record_grade(root / GRADES_CSV, "case_id", ("case_id", "grade"), case_id, "grade", grade)
    return case_dir


def _generic_scheme_for_write(root: Path, label_scheme: str) -> str:
    """A generic dataset keeps labels in the caller's scheme, recorded once in ``labels.json``."""
    name = get_scheme(label_scheme).name
    record = root / GENERIC_SCHEME_FILE
    if record.exists():
        existing = _generic_scheme(root)
        if existing != name:
            raise DataError(record, f"this generic dataset uses label scheme {existing!r}; cannot add a {name!r} case")
    else:
        save_json({"label_scheme": name}, record)
    return name


def _write_msd(root: Path, case_id, arrays, affine, seg, grade, header) -> Path:
    ordered = sorted(MSD_CHANNELS, key=MSD_CHANNELS.get)
    volume = np.stack([arrays[c] for c in ordered], axis=-1)
    sub = "Tr" if seg is not None else "Ts"
    image_path = root / f"images{sub}" / f"{case_id}.nii.gz"
    save_nifti(volume, affine, image_path, header=header, dtype=np.float32)
    if seg is not None:
        save_nifti(seg, affine, root / "labelsTr" / f"{case_id}.nii.gz", header=header, dtype=np.uint8)
    meta_path = root / "dataset.json"
    meta = _read_json(meta_path) if meta_path.exists() else _msd_dataset_json()
    if seg is not None:
        entry = {"image": f"./imagesTr/{case_id}.nii.gz", "label": f"./labelsTr/{case_id}.nii.gz"}
        meta["training"] = sorted([e for e in meta.get("training", []) if e.get("image") != entry["image"]] + [entry],
                                  key=lambda e: e["image"])
    else:
        entry = f"./imagesTs/{case_id}.nii.gz"
        meta["test"] = sorted(set(meta.get("test", [])) | {entry})
    meta["numTraining"] = len(meta.get("training", []))
    meta["numTest"] = len(meta.get("test", []))
    save_json(meta, meta_path)
    if grade is not None:
        _record_grade(root / GRADES_CSV, "case_id", ("case_id", "grade"), case_id, "grade", grade)
    return image_path


def _msd_dataset_json() -> dict:
    return {
        "name": "BRATS",
        "description": "Gliomas segmentation tumour and oedema in on brain images",
        "tensorImageSize": "4D",
        "modality": dict(MSD_MODALITY_NAMES),
        "labels": dict(MSD_LABEL_NAMES),
        "numTraining": 0,
        "numTest": 0,
        "training": [],
        "test": [],
    }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, f"unreadable JSON ({exc})") from exc


# ----------------------------------------------------------------------------------------------- detection


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _is_msd(folder: Path) -> bool:
    return (folder / "dataset.json").is_file() and (folder / "imagesTr").is_dir()


def _detect_here(folder: Path) -> str | None:
    if _is_msd(folder):
        return "msd"
    if (folder / BRATS2019_DIR).is_dir() or any(
        (folder / g).is_dir() and any(CASE_DIR_PATTERNS["brats2019"].match(d.name) for d in _subdirs(folder / g))
        for g in GRADES
    ):
        return "brats2019"
    names = [d.name for d in _subdirs(folder)]
    for layout in ("brats2020", "brats2021"):
        if any(CASE_DIR_PATTERNS[layout].match(n) for n in names):
            return layout
    new = [n for n in names if CASE_DIR_PATTERNS["brats2023"].match(n)]
    if new:
        # post-treatment (2024) ids carry a timepoint >= 100 (BraTS-GLI-02073-100); pre-operative ones 000/001
        return "brats2024" if any(int(n.rsplit("-", 1)[1]) >= 100 for n in new) else "brats2023"
    if any(_classify_files(d)[0] for d in _subdirs(folder)):
        return "generic"
    return None


def _data_root(root: Path) -> tuple[Path, str | None]:
    """The folder holding the cases: ``root`` or, for a wrapped download, its single sub-folder with cases."""
    layout = _detect_here(root)
    if layout is not None and layout != "generic":
        return root, layout
    for sub in _subdirs(root):
        sub_layout = _detect_here(sub)
        if sub_layout is not None and sub_layout != "generic":
            return sub, sub_layout
    return root, layout


def detect_layout(root) -> str:
    """Name of the layout found at ``root`` (or in a wrapping sub-folder); ``DataError`` if none fits."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder does not exist")
    _, layout = _data_root(root)
    if layout is None:
        raise DataError(
            root,
            "no known dataset layout found (expected BraTS 2019-2024 case folders, an MSD Task01 folder with "
            "dataset.json + imagesTr/, or one folder per case with files named after their contrast)",
        )
    return layout


# ----------------------------------------------------------------------------------------------- readers

_LABEL_TOKENS = {"seg", "segm", "segmentation", "label", "labels", "mask", "gt", "truth"}
_T1C_TOKENS = {"t1c", "t1ce", "t1gd", "t1post", "t1wce", "t1cgd", "t1gad", "t1contrast"}
_CONTRAST_MODIFIERS = {"ce", "c", "gd", "gad", "post", "contrast"}
_T1N_TOKENS = {"t1n", "t1", "t1w", "t1pre", "t1native"}
_T2W_TOKENS = {"t2w", "t2"}


def _strip_nifti(name: str) -> str | None:
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def contrast_of_filename(name: str) -> str | None:
    """Canonical key (a contrast or ``label``) a NIfTI file name stands for, by aliases; ``None`` if unclear."""
    stem = _strip_nifti(name)
    if stem is None:
        return None
    tokens = [t for t in re.split(r"[^a-z0-9]+", stem.lower()) if t]
    token_set = set(tokens)
    if token_set & _LABEL_TOKENS and "brain" not in token_set and "brainmask" not in token_set:
        return "label"
    if "flair" in stem.lower() or "t2f" in token_set:
        return "t2f"
    if token_set & _T1C_TOKENS or (token_set & {"t1", "t1w"} and token_set & _CONTRAST_MODIFIERS):
        return "t1c"
    if token_set & _T2W_TOKENS:
        return "t2w"
    if token_set & _T1N_TOKENS:
        return "t1n"
    return None


def _classify_files(case_dir: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    found: dict[str, list[Path]] = {}
    unknown = []
    try:
        entries = sorted(case_dir.iterdir())
    except OSError:
        return {}, []
    for p in entries:
        if not p.is_file() or p.name.startswith("."):
            continue
        key = contrast_of_filename(p.name)
        if key is not None:
            found.setdefault(key, []).append(p)
        elif _strip_nifti(p.name) is not None:
            unknown.append(p)
    return found, unknown


def _generic_scheme(root: Path) -> str:
    record = root / GENERIC_SCHEME_FILE
    if not record.exists():
        return LAYOUTS["generic"].label_scheme
    meta = _read_json(record)
    if not isinstance(meta, dict) or "label_scheme" not in meta:
        raise DataError(record, "needs a 'label_scheme' entry")
    return get_scheme(meta["label_scheme"]).name


def layout_label_scheme(root, layout: str | None = None) -> str:
    """Label scheme of the dataset at ``root`` (generic datasets may record theirs in ``labels.json``)."""
    root = Path(root)
    layout = detect_layout(root) if layout in (None, "auto") else get_layout(layout).name
    if layout == "generic":
        return _generic_scheme(_data_root(root)[0])
    return LAYOUTS[layout].label_scheme


def _item(case_id: str, files: Mapping[str, Path | None], grade, require_label: bool) -> dict:
    item: dict[str, Any] = {"id": case_id}
    for c in CONTRASTS:
        item[c] = str(files[c]) if files.get(c) is not None else None
    label = files.get("label")
    item["label"] = str(label) if label is not None and (require_label or Path(label).exists()) else None
    item["grade"] = grade
    return item


def unread_folders(root, layout: str, items: Sequence[Mapping]) -> list[Path]:
    """Folders where a BraTS layout expects case folders but whose names do not match it (a misnamed case drops
    out of the datalist silently otherwise)."""
    if layout not in ("brats2019", "brats2020", "brats2021", "brats2023", "brats2024"):
        return []
    base, _ = _data_root(Path(root).resolve())
    parents = [_brats2019_base(base) / g for g in GRADES] if layout == "brats2019" else [base]
    ids = {it["id"] for it in items}
    return [d for parent in parents for d in _subdirs(parent) if d.name not in ids and d.name not in ("qc", "__MACOSX")]


def read_layout(root, layout: str | None = None, require_label: bool = True) -> list[dict]:
    """Canonical items of every case at ``root``, sorted by id (see the module docstring).

    ``layout=None``/``"auto"`` detects it. With ``require_label`` a missing label keeps its expected path (so
    validation reports it); without, absent labels become ``None``.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise DataError(root, "dataset folder does not exist")
    base, detected = _data_root(root)
    layout = detected if layout in (None, "auto") else get_layout(layout).name
    if layout is None:
        detect_layout(root)  # raises the explanatory error
    if layout == "msd":
        items = _read_msd(base if _is_msd(base) else root, require_label)
    elif layout == "brats2019":
        items = _read_brats2019(base, require_label)
    elif layout == "generic":
        items = _read_generic(base, require_label)
    else:
        items = _read_brats(base, layout, require_label)
    if not items:
        raise DataError(root, f"no cases found for layout {layout!r} ({LAYOUTS[layout].description})")
    ids = [it["id"] for it in items]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DataError(root, f"duplicate case ids {dupes[:5]}")
    return sorted(items, key=lambda it: it["id"])


def _read_brats2019(root: Path, require_label: bool) -> list[dict]:
    base = _brats2019_base(root)
    items = []
    for grade in GRADES:
        for case_dir in _subdirs(base / grade):
            if CASE_DIR_PATTERNS["brats2019"].match(case_dir.name):
                files = _case_files("brats2019", case_dir, case_dir.name)
                items.append(_item(case_dir.name, files, grade, require_label))
    return items


def _read_brats(root: Path, layout: str, require_label: bool) -> list[dict]:
    pattern = CASE_DIR_PATTERNS["brats2023" if layout == "brats2024" else layout]
    if layout == "brats2020":
        grades = {}
        if (root / BRATS2020_MAPPING).exists():
            grades = read_grades(root / BRATS2020_MAPPING, "BraTS_2020_subject_ID", "Grade")
    else:
        grades = read_grades(root / GRADES_CSV) if (root / GRADES_CSV).exists() else {}
    items = []
    for case_dir in _subdirs(root):
        if pattern.match(case_dir.name):
            files = _case_files(layout, case_dir, case_dir.name)
            items.append(_item(case_dir.name, files, grades.get(case_dir.name), require_label))
    return items


def _read_generic(root: Path, require_label: bool) -> list[dict]:
    grades = read_grades(root / GRADES_CSV) if (root / GRADES_CSV).exists() else {}
    items = []
    for case_dir in _subdirs(root):
        found, _unknown = _classify_files(case_dir)
        if not found:
            continue
        problems = []
        files: dict[str, Path | None] = {}
        for key in CONTRASTS + ("label",):
            candidates = found.get(key, [])
            if len(candidates) > 1:
                problems.append(
                    DataError(case_dir, f"several files look like {key}: {[p.name for p in candidates]}")
                )
                files[key] = None
            elif candidates:
                files[key] = candidates[0]
            else:
                files[key] = None
                if key != "label":
                    problems.append(DataError(case_dir, f"no file for contrast {key} (file names: {_aliases(key)})"))
                elif require_label:
                    problems.append(DataError(case_dir, f"no label file (file names: {_aliases('label')})"))
        item = _item(case_dir.name, files, grades.get(case_dir.name), require_label)
        if files["label"] is None:
            item["label"] = None
        if problems:
            item["problems"] = problems
        items.append(item)
    return items


def _aliases(key: str) -> str:
    return {
        "t1n": "t1n|t1|t1w",
        "t1c": "t1c|t1ce|t1gd|t1_post",
        "t2w": "t2w|t2",
        "t2f": "t2f|flair",
        "label": "seg|label|mask",
    }[key]


def _read_msd(root: Path, require_label: bool) -> list[dict]:
    meta_path = root / "dataset.json"
    meta = _read_json(meta_path)
    channels = _msd_channels(meta, meta_path)
    grades = read_grades(root / GRADES_CSV) if (root / GRADES_CSV).exists() else {}
    entries = [(e["image"], e.get("label")) for e in meta.get("training", []) if isinstance(e, dict) and "image" in e]
    if not require_label:
        entries += [(e if isinstance(e, str) else e.get("image"), None) for e in meta.get("test", [])]
    items = []
    for image_rel, label_rel in entries:
        image = (root / image_rel).resolve()
        case_id = _strip_nifti(image.name) or image.name
        files = {c: image for c in CONTRASTS}
        files["label"] = (root / label_rel).resolve() if label_rel else None
        item = _item(case_id, files, grades.get(case_id), require_label)
        if label_rel is None and require_label:
            item["problems"] = [DataError(meta_path, f"case {case_id} has no label entry")]
        for c in CONTRASTS:
            item[f"{c}_channel"] = channels[c]
        items.append(item)
    return items


def _msd_channels(meta: Any, where: Path) -> dict[str, int]:
    """Channel of each contrast from ``dataset.json``'s ``modality`` names (Task01 order when absent)."""
    modality = meta.get("modality") if isinstance(meta, dict) else None
    if not modality:
        return dict(MSD_CHANNELS)
    channels = {}
    for index, name in modality.items():
        key = contrast_of_filename(f"{name}.nii")
        if key in CONTRASTS:
            channels[key] = int(index)
    if sorted(channels) != sorted(CONTRASTS):
        raise DataError(where, f"'modality' {modality} does not name the four contrasts FLAIR, T1w, T1gd, T2w")
    return channels
