"""Where a bundle's training data comes from: a datalist, a dataset folder, or embedded phantoms."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from common.io import cache_dir as default_cache_dir



def phantom_datalist(
    cache_dir: str | os.PathLike | None = None,
    n: int = 8,
    shape: Sequence[int] = (64, 64, 32),
    seed: int = 0,
    folds: int = 4,
    layout: str = "brats2023",
    progress: bool = True,
) -> Path:
    """Datalist of ``n`` phantom cases, made on first use and reused afterwards (keyed by n/shape/seed).

    The folder is built in a temporary sibling and renamed when complete, so an interrupted run never leaves
    a half-made dataset that later runs would trust.
    """
    from common.data.datalist import build_datalist
    from common.phantom import make_phantoms

    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    name = f"phantoms_{layout}_n{n}_{'x'.join(str(int(s)) for s in shape)}_seed{seed}"
    final = cache / name
    datalist = final / "datalist.json"
    if datalist.exists():
        return datalist
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=cache))
    try:
        make_phantoms(tmp / "data", n=n, layout=layout, seed=seed, shape=tuple(int(s) for s in shape), progress=progress)
        build_datalist(tmp / "data", tmp / "datalist.json", folds=folds, seed=seed, val_fold=0, progress=progress)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: use its copy
            if not datalist.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return datalist


def resolve_datalist(
    datalist: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    **phantom_kwargs,
) -> Path:
    """A datalist given -> itself; a dataset folder -> a datalist built for it (in ``cache_dir`` or beside the
    cache); neither -> the embedded phantom data (made on first use)."""
    from common.io import DataError

    if datalist:
        path = Path(datalist)
        if not path.is_file():
            raise DataError(path, "datalist file does not exist")
        return path
    if dataset_dir:
        from common.data.datalist import build_datalist

        root = Path(dataset_dir)
        if not root.is_dir():
            raise DataError(root, "dataset_dir is not a folder")
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        out = cache / "datalists" / (root.resolve().as_posix().strip("/").replace("/", "_") + ".json")
        build_datalist(root, out, check="quick")
        return out
    return phantom_datalist(cache_dir, **phantom_kwargs)


def training_items(datalist: str | os.PathLike, section: str = "training", label_scheme_to: str | None = None) -> list[dict]:
    """Items of one datalist section with absolute paths, each tagged with the datalist's label scheme
    (``label_scheme``) so transforms can convert masks to the scheme a network expects."""
    from common.data.datalist import datalist_info, load_datalist
    from common.io import DataError

    items = load_datalist(datalist, section)
    if not items:
        raise DataError(datalist, f"section {section!r} is empty")
    scheme = datalist_info(datalist).get("label_scheme", "brats2023")
    for item in items:
        item["label_scheme"] = scheme
    return items
