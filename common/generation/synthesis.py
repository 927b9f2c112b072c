"""Resumable, sharded synthesis of a whole dataset: one generated case folder per conditioning mask.

Why: a synthetic dataset of thousands of 3-D cases takes days (GliomaGen: ~48 h for 2124 volumes), so a run
must survive being killed and must spread over processes, GPUs and machines without two workers writing the
same case.

Guarantees (``synthesize_dataset``):

* **Never half-written.** A case is generated into ``<out>/.synthesis/partial/<id>.<pid>.<token>/``, its record
  is written atomically to ``<out>/.synthesis/records/<id>.json``, then the finished folder is renamed to
  ``<out>/<id>`` (one atomic ``rename``). A case counts as done only when both its folder and its record
  exist, so a run killed at any moment (``kill -9``) and started again neither loses nor duplicates a case;
  left-over partial folders of this worker's cases are deleted on start.
* **Sharded deterministically.** Case ``k`` of the list belongs to worker ``k % n``; ``shard="i/n"`` picks a
  worker, and under ``torchrun`` (``ignite.distributed`` rank/world size, or ``RANK``/``WORLD_SIZE``) each rank
  splits its shard again, so ``--shard i/n`` per machine times torchrun ranks per machine covers the list once.
* **Reproducible.** Each case gets the seed ``case["seed"]`` or one derived from ``(seed, case id)`` (CRC-32),
  never from the worker, so 2 shards write byte-identical files to 1 run.
* **A manifest.** ``merge_manifest`` gathers the records into ``<out>/manifest.json`` under a file lock (every
  worker calls it when it finishes; the last one sees all records).

Quality score (the paper's high-quality subset, HQS): ``mask_agreement_score`` is the *correlation ratio*
(eta squared) of the generated intensities with the mask's compartments, inside the tumor and a shell of
surrounding tissue, averaged over contrasts. It is the share of the intensity variance that the mask explains:
1 when every compartment is homogeneous and distinct from its neighbours (the image follows its mask), near 0
for noise or a tumor the image ignores. ``select_high_quality`` keeps the best-scoring fraction.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from common import CONTRASTS
from common.data.labels import TUMOR_COMPARTMENTS, compartment_mask, get_scheme
from common.io import DataError, save_json

STATE_DIR = ".synthesis"
MANIFEST = "manifest.json"
_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")

GenerateCase = Callable[[dict, int], Mapping[str, np.ndarray]]


# ----------------------------------------------------------------------------------------------- sharding


def parse_shard(shard: str | Sequence[int]) -> tuple[int, int]:
    """``"i/n"`` (or ``(i, n)``) -> ``(i, n)`` with ``0 <= i < n``."""
    if isinstance(shard, (tuple, list)) and len(shard) == 2:
        i, n = int(shard[0]), int(shard[1])
    else:
        m = _SHARD.match(str(shard))
        if not m:
            raise DataError("--shard", f"{shard!r} is not of the form i/n (e.g. 0/4)")
        i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise DataError("--shard", f"{shard!r}: need n >= 1 and 0 <= i < n")
    return i, n


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process: ``ignite.distributed`` when a group is up, else torchrun's env."""
    import ignite.distributed as idist

    if idist.get_world_size() > 1:
        return idist.get_rank(), idist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def worker_shard(shard: str | Sequence[int] = "0/1", distributed: bool = True) -> tuple[int, int]:
    """This worker's ``(index, count)``: ``--shard i/n`` refined by the torchrun rank ``r`` of ``w``."""
    i, n = parse_shard(shard)
    r, w = distributed_rank() if distributed else (0, 1)
    return i * w + r, n * w


def shard_cases(cases: Sequence[dict], index: int, count: int) -> list[dict]:
    """Case ``k`` belongs to worker ``k % count`` (so shards interleave and finish at about the same time)."""
    return [c for k, c in enumerate(cases) if k % count == index]


def case_seed(case: Mapping, seed: int = 0) -> int:
    """The case's own ``seed``, else a stable 31-bit seed from ``(seed, case id)`` (not Python's salted hash)."""
    if case.get("seed") is not None:
        return int(case["seed"])
    return zlib.crc32(f"{int(seed)}:{case['id']}".encode()) & 0x7FFFFFFF


# ----------------------------------------------------------------------------------------------- quality


def mask_agreement_score(
    volumes: Mapping[str, np.ndarray], labels: np.ndarray, scheme: str = "brats2024", shell: int = 3
) -> float | None:
    """Correlation ratio (eta^2) of each contrast's intensities with the mask's compartments, mean over contrasts.

    Region: the tumor (every non-background, non-head compartment) dilated by ``shell`` voxels; groups: each
    compartment value, and the shell as one more group. eta^2 = between-group / total variance, in [0, 1].
    ``None`` when the mask has no tumor or the region is constant.
    """
    from scipy import ndimage

    scheme_s = get_scheme(scheme)
    labels = np.asarray(labels)
    tumor = compartment_mask(labels, scheme_s, TUMOR_COMPARTMENTS + ("RC",))
    if not tumor.any():
        return None
    roi = ndimage.binary_dilation(tumor, iterations=shell) if shell > 0 else tumor
    groups = np.where(tumor, labels.astype(np.int64) + 1, 0)[roi]  # 0 = the surrounding shell
    counts = np.bincount(groups)
    present = counts > 0
    scores = []
    for name in volumes:
        x = np.asarray(volumes[name], dtype=np.float64)[roi]
        total = float(((x - x.mean()) ** 2).sum())
        if total <= 0:
            continue
        means = np.bincount(groups, weights=x)[present] / counts[present]
        between = float((counts[present] * (means - x.mean()) ** 2).sum())
        scores.append(between / total)
    return float(np.mean(scores)) if scores else None


def select_high_quality(
    manifest: Mapping | str | os.PathLike, fraction: float = 1.0, key: str = "quality", count: int | None = None
) -> list[str]:
    """Ids of the best ``fraction`` (or the best ``count``) of the manifest's cases by ``key`` (ties by id;
    unscored cases last)."""
    if not 0 < float(fraction) <= 1:
        raise DataError("fraction", f"{fraction!r} must be in (0, 1]")
    if count is not None and int(count) < 1:
        raise DataError("count", f"{count!r} must be >= 1")
    if not isinstance(manifest, Mapping):
        path = Path(manifest)
        if path.is_dir():
            path = path / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(path, f"cannot read the synthesis manifest ({exc})") from exc
    cases = list(manifest.get("cases", []))
    if not cases:
        return []
    ranked = sorted(cases, key=lambda c: (c.get(key) is None, -(c.get(key) or 0.0), c["id"]))
    keep = int(count) if count is not None else max(1, int(np.ceil(float(fraction) * len(ranked))))
    return [c["id"] for c in ranked[:keep]]


# ----------------------------------------------------------------------------------------------- writer


class BratsCaseWriter:
    """Write a generated case as a BraTS-layout folder (4 contrasts + ``-seg`` in the layout's own labels).

    Volumes go on the mask's affine and header; the mask is converted from ``case["scheme"]`` (e.g.
    ``six_label``: head -> background) to the layout's scheme with ``common.data.layouts.write_case``.
    """

    FOLDER_LAYOUTS = ("brats2021", "brats2023", "brats2024", "generic")  # one folder per case, named by its id

    def __init__(self, layout: str = "brats2024", contrasts: Sequence[str] = CONTRASTS):
        if layout not in self.FOLDER_LAYOUTS:
            raise DataError("--layout", f"{layout!r}: synthesis writes one folder per case; use one of "
                                        f"{self.FOLDER_LAYOUTS}")
        self.layout = layout
        self.contrasts = tuple(contrasts)

    def __call__(self, root: Path, case: Mapping, volumes: Mapping[str, np.ndarray]) -> Path:
        from common.data.layouts import write_case

        return write_case(
            root, self.layout, case["id"], {c: volumes[c] for c in self.contrasts}, case["affine"],
            label=case.get("mask"), label_scheme=case.get("scheme", "brats2024"), header=case.get("header"),
        )


# ----------------------------------------------------------------------------------------------- state


def _state(out_dir: Path) -> tuple[Path, Path]:
    return out_dir / STATE_DIR / "records", out_dir / STATE_DIR / "partial"


def _is_done(out_dir: Path, case_id: str) -> bool:
    records, _ = _state(out_dir)
    folder, record = out_dir / case_id, records / f"{case_id}.json"
    if folder.exists() and not record.exists():
        raise DataError(
            folder, "case folder exists without a synthesis record (not written by synthesize_dataset, or its "
            f"{STATE_DIR}/ folder was removed); remove the folder or write to another output folder",
        )
    return folder.exists() and record.exists()


def _clean_partials(out_dir: Path, ids: set[str]) -> int:
    """Delete left-over partial folders of ``ids`` (only this worker writes those cases)."""
    _, partial = _state(out_dir)
    removed = 0
    if partial.is_dir():
        for p in partial.iterdir():
            if p.name.rsplit(".", 2)[0] in ids:  # <id>.<pid>.<token>
                shutil.rmtree(p, ignore_errors=True)
                removed += 1
    return removed


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def merge_manifest(out_dir: str | os.PathLike) -> dict:
    """Gather every case record into ``<out>/manifest.json`` (atomic, under a lock); returns the manifest."""
    out_dir = Path(out_dir)
    records, _ = _state(out_dir)
    with _locked(out_dir / STATE_DIR / "manifest.lock"):
        cases = []
        for p in sorted(records.glob("*.json")) if records.is_dir() else []:
            if (out_dir / p.stem).is_dir():
                cases.append(json.loads(p.read_text()))
        plan_path = out_dir / STATE_DIR / "plan.json"
        planned = json.loads(plan_path.read_text())["ids"] if plan_path.exists() else [c["id"] for c in cases]
        have = {c["id"] for c in cases}
        missing = [i for i in planned if i not in have]
        scores = [c["quality"] for c in cases if c.get("quality") is not None]
        manifest = {
            "n_cases": len(cases),
            "n_planned": len(planned),
            "complete": not missing,
            "missing": missing,
            "quality": {
                "definition": "mask_agreement_score: eta^2 of intensities on mask compartments (tumor + shell)",
                "mean": float(np.mean(scores)) if scores else None,
            },
            "cases": cases,
        }
        save_json(manifest, out_dir / MANIFEST)
    return manifest


# ----------------------------------------------------------------------------------------------- main loop


def load_case_mask(case: dict, scheme: str = "brats2024") -> dict:
    """Add ``mask`` (uint8), ``affine``, ``header`` and ``scheme`` from ``case["label"]`` (checked) if absent."""
    from common.generation.sources import load_mask

    case = dict(case)
    case.setdefault("scheme", scheme)
    if case.get("mask") is None and case.get("label"):
        mask, affine, header = load_mask(case["label"], scheme=case["scheme"])
        case.update(mask=mask, affine=affine, header=header)
    if case.get("affine") is None:
        raise DataError(case.get("id", "case"), "case has neither a 'label' file nor 'mask' + 'affine' arrays")
    return case


def _check_volumes(case: Mapping, volumes: Mapping[str, np.ndarray], contrasts: Sequence[str]) -> dict:
    missing = [c for c in contrasts if c not in volumes]
    if missing:
        raise DataError(case["id"], f"generate_case returned {sorted(volumes)}; missing contrasts {missing}")
    out = {}
    shape = None if case.get("mask") is None else np.asarray(case["mask"]).shape
    for c in contrasts:
        v = np.asarray(volumes[c], dtype=np.float32)
        if v.ndim != 3 or (shape is not None and v.shape != shape):
            raise DataError(case["id"], f"generated {c} has shape {v.shape}; expected the mask's grid {shape}")
        if not np.isfinite(v).all():
            raise DataError(case["id"], f"generated {c} contains NaN/Inf")
        out[c] = v
    return out


def synthesize_dataset(
    cases: Sequence[dict],
    generate_case: GenerateCase,
    out_dir: str | os.PathLike,
    writer: Callable[[Path, Mapping, Mapping[str, np.ndarray]], Path] | None = None,
    shard: str | Sequence[int] = "0/1",
    progress: bool = True,
    seed: int = 0,
    label_scheme: str = "brats2024",
    contrasts: Sequence[str] = CONTRASTS,
    quality: Callable[[Mapping[str, np.ndarray], np.ndarray, str], float | None] | None = mask_agreement_score,
    distributed: bool = True,
) -> dict:
    """Generate this worker's share of ``cases`` into ``out_dir``, skipping cases already complete.

    ``cases``: dicts with a unique ``id`` and either ``label`` (a mask NIfTI in ``label_scheme`` or the case's
    own ``scheme``) or ``mask`` + ``affine`` (+ ``header``); optional ``seed``. ``generate_case(case, seed)``
    gets the case with ``mask``/``affine``/``header``/``scheme`` filled in and returns ``{contrast: 3-D array}``
    on the mask's grid. ``writer(root, case, volumes)`` writes the case folder ``root/<id>`` (default
    ``BratsCaseWriter()``: BraTS 2024 layout). Returns a summary (generated, skipped, seconds, manifest path).
    """
    out_dir = Path(out_dir)
    writer = writer or BratsCaseWriter(contrasts=contrasts)
    ids = [str(c.get("id", "")) for c in cases]
    if any(not i or "/" in i or i.startswith(".") for i in ids):
        raise DataError("cases", "every case needs an 'id' usable as a folder name (no '/', not starting with '.')")
    dup = sorted(i for i, k in Counter(ids).items() if k > 1)
    if dup:
        raise DataError("cases", f"duplicate case ids {dup[:5]}")
    index, count = worker_shard(shard, distributed)
    mine = shard_cases(list(cases), index, count)
    records, partial = _state(out_dir)
    records.mkdir(parents=True, exist_ok=True)
    partial.mkdir(parents=True, exist_ok=True)
    save_json({"ids": ids}, out_dir / STATE_DIR / "plan.json")
    _clean_partials(out_dir, {c["id"] for c in mine})
    todo = [c for c in mine if not _is_done(out_dir, c["id"])]
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="case", desc=f"synthesis {index}/{count}")
    try:
        for raw in todo:
            t0 = time.perf_counter()
            case = load_case_mask(raw, raw.get("scheme", label_scheme))
            s = case_seed(case, seed)
            volumes = _check_volumes(case, generate_case(case, s), contrasts)
            work = partial / f"{case['id']}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
            try:
                folder = Path(writer(work, case, volumes))
                score = None
                if quality is not None and case.get("mask") is not None:
                    score = quality(volumes, case["mask"], case["scheme"])
                record = {
                    "id": case["id"],
                    "seed": s,
                    "source": str(case.get("label") or ""),
                    "files": sorted(str(Path(case["id"]) / p.relative_to(folder)) for p in folder.rglob("*")
                                    if p.is_file()),
                    "quality": score,
                    "seconds": round(time.perf_counter() - t0, 3),
                    "shard": f"{index}/{count}",
                }
                record.update({k: case[k] for k in ("grade", "kind", "source_id") if k in case})
                save_json(record, records / f"{case['id']}.json")
                os.rename(folder, out_dir / case["id"])  # the commit point: one atomic rename
            finally:
                shutil.rmtree(work, ignore_errors=True)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    manifest = merge_manifest(out_dir)
    return {
        "shard": f"{index}/{count}",
        "assigned": len(mine),
        "generated": len(todo),
        "skipped": len(mine) - len(todo),
        "seconds": round(time.perf_counter() - start, 3),
        "complete": manifest["complete"],
        "manifest": str(out_dir / MANIFEST),
    }
