"""File I/O that fails loudly and never leaves half-written outputs behind."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; outputs get the usual permissions instead
_FILE_MODE = 0o666 & ~_current_umask()


def cache_dir() -> Path:
    """The project's one cache folder (phantom anatomy, phantom datasets made on first use).

    ``$BRATS_SYNTH_CACHE``, else ``$XDG_CACHE_HOME/brats-synth``, else ``~/.cache/brats-synth``.
    """
    base = os.environ.get("BRATS_SYNTH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "brats-synth"
    )
    return Path(base)


def file_hash(path: str | os.PathLike, hash_type: str = "sha256") -> str:
    """Hex digest of a file, read in chunks (weights can be GBs): release hashes, feature-cache keys, sidecars."""
    import hashlib

    h = hashlib.new(hash_type)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DataError(ValueError):
    """Bad input data; the message names the file (or case) and the problem."""

    def __init__(self, where: Any, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{where}: {problem}")


def check_flag(flag: str, ok: bool, problem: str) -> None:
    """Refuse a command-line value before any work starts: ``error: --<flag>: <problem>``."""
    if not ok:
        raise DataError(f"--{flag.lstrip('-')}", problem)


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def text_bool(value: Any) -> bool | None:
    """``value`` as a bool if it is one or spells one, else None: the bundle CLI (fire) passes ``--x false`` as the
    text "false", which Python reads as true."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    return True if text in _TRUE else False if text in _FALSE else None


def check_bool(flag: str, value: Any) -> bool:
    """``value`` as a bool (see :func:`text_bool`), else a refusal naming the flag."""
    parsed = text_bool(value)
    check_flag(flag, parsed is not None, f"must be true or false, got {value!r}")
    return parsed


def check_bool_list(flag: str, value: Any) -> tuple[bool, ...]:
    """A list of on/off values as the bundle CLI delivers it: fire reads ``--x [false,true]`` as the texts
    ['false', 'true'], both true to Python (every level silently on); each item is read as :func:`check_bool` does."""
    if isinstance(value, str):
        import json

        try:
            value = json.loads(value.strip().lower())
        except ValueError:
            value = None
        check_flag(flag, isinstance(value, list), "must be a list of true/false values, e.g. [false,true]")
    check_flag(flag, isinstance(value, (list, tuple)), f"must be a list of true/false values, got {value!r}")
    parsed = tuple(text_bool(v) for v in value)
    check_flag(flag, None not in parsed, f"must be a list of true/false values, got {list(value)!r}")
    return parsed


def check_choice(flag: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value`` if it is one of ``choices``, else a refusal naming the flag and the choices."""
    choices = tuple(choices)
    check_flag(flag, value in choices, f"unknown value {value!r}; choose one of {', '.join(map(str, choices))}")
    return value


def check_output(path: str | os.PathLike, kind: str = "dir", flag: str | None = None) -> Path:
    """Make sure ``path`` can be written as a ``kind`` ("dir" or "file") before the work that fills it starts:
    no regular file on the way, a file output that is not a folder (and the reverse), a writable first existing
    folder. Creates nothing."""
    path = Path(path).expanduser()
    where = f"--{flag.lstrip('-')} {path}" if flag else str(path)
    if kind == "file" and path.is_dir():
        raise DataError(where, "is a folder; give a file name")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise DataError(where, "is a file, not a folder; give a folder (new or existing)")
    parent = path if kind == "dir" else path.parent
    probe = parent.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise DataError(where, f"{probe} is a file, so no folder can be made under it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DataError(where, f"cannot write in {probe} (permission denied)")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the suffix(es) so libraries that dispatch on the extension (nibabel, PIL) still work
    suffix = "".join(path.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def save_json(obj: Any, path: str | os.PathLike, indent: int = 2) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent, default=_json_default) + "\n")
    return Path(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, header=None, dtype=None) -> Path:
    """Write a NIfTI atomically; ``header`` (e.g. from the input mask) keeps orientation codes and spacing."""
    import nibabel as nib

    data = np.asarray(array)
    if dtype is not None:
        data = data.astype(dtype)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64), header=header)
    if header is not None:
        img.header.set_data_dtype(data.dtype)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def open_nifti(path: str | os.PathLike):
    """Open a NIfTI header (no voxel data read yet), naming the file when it is missing, empty or corrupt."""
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise DataError(path, "file does not exist")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty (0 bytes)")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise DataError(path, f"unreadable image ({type(exc).__name__}: {exc})") from exc
    if int(np.prod(img.shape)) == 0:
        raise DataError(path, "image has no voxels")
    return img


def load_nifti(path: str | os.PathLike, dtype=np.float32, allow_nan: bool = False):
    """Read a NIfTI volume -> (array, affine, header), with errors that name the file and the problem."""
    img = open_nifti(path)
    try:
        data = np.asarray(img.dataobj)
    except Exception as exc:  # truncated gzip streams fail only when the voxels are read
        raise DataError(path, f"unreadable image ({type(exc).__name__}: {exc})") from exc
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    if not allow_nan and np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        raise DataError(path, f"contains {n_bad} NaN/Inf voxels")
    return data, img.affine, img.header


def torch_save(obj: Any, path: str | os.PathLike) -> Path:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def torch_load(path: str | os.PathLike, map_location="cpu") -> Any:
    """Load a checkpoint safely (``weights_only=True``), naming the file when it fails."""
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        raise DataError(path, "checkpoint file does not exist")
    if path.is_dir():
        raise DataError(path, "is a folder, not a checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc).lower():
            why = ("not a plain weights file: it is not a PyTorch checkpoint, or it pickles Python objects that "
                   "weights_only=True refuses to run (save a state dict of tensors and plain values)")
        else:
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            why = f"{type(exc).__name__}: {first}"
        raise DataError(path, f"cannot load checkpoint ({why})") from exc
