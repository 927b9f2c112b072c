"""A dataset through the pipeline: shards for array jobs, resume, worker processes, QC pictures, failure summary.

A case is *finished* when its ``preprocess.json`` record (written last, atomically) exists, was made with the
same settings, and every output file it lists exists. Anything else is (re)done.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.io import DataError, check_output, load_nifti, save_json

RECORD_NAME = "preprocess.json"
QC_DIR = "qc"


@dataclass
class RunSummary:
    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished earlier (resume)
    failed: dict[str, str] = field(default_factory=dict)  # case id -> error message
    shard: str = "0/1"
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def report(self) -> str:
        lines = [f"preprocess shard {self.shard}: {len(self.processed)} processed, {len(self.skipped)} already "
                 f"finished (skipped), {len(self.failed)} failed, {self.seconds:.0f} s"]
        lines += [f"  FAILED {case}: {msg}" for case, msg in sorted(self.failed.items())]
        return "\n".join(lines)


def parse_shard(shard: Any) -> tuple[int, int]:
    """'i/n' (0-based i, as SLURM_ARRAY_TASK_ID with --array=0-(n-1)) -> (i, n)."""
    if shard is None:
        return 0, 1
    if isinstance(shard, (tuple, list)) and len(shard) == 2:
        index, count = shard
    else:
        parts = str(shard).split("/")
        if len(parts) != 2:
            raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {shard!r}")
        index, count = parts
    try:
        index, count = int(index), int(count)
    except ValueError:
        raise ValueError(f"--shard must look like i/n with integers, got {shard!r}") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {shard!r}: need n >= 1 and 0 <= i < n")
    return index, count


def select_shard(case_ids: list[str], index: int, count: int) -> list[str]:
    """Round-robin over the sorted ids: deterministic, balanced, every case in exactly one shard."""
    return sorted(case_ids)[index::count]


def record_path(output: Path, case_id: str) -> Path:
    return Path(output) / case_id / RECORD_NAME


def is_finished(output: Path, case_id: str, config_dict: dict) -> bool:
    path = record_path(output, case_id)
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if record.get("config") != json.loads(json.dumps(config_dict)):
        return False
    return all((Path(output) / rel).is_file() for rel in record.get("outputs", [])) and bool(record.get("outputs"))


def _load_item(item: dict) -> tuple[dict, tuple | None]:
    """Read a canonical item's volumes -> ({contrast: (array, affine)}, (label, affine) | None)."""
    from common import CONTRASTS

    problems = item.get("problems") or []
    if problems:
        raise DataError(item["id"], "; ".join(str(p) for p in problems))
    images = {}
    for c in CONTRASTS:
        path = item.get(c)
        if path is None:
            raise DataError(item["id"], f"no file for contrast {c}")
        array, affine, _ = load_nifti(path)
        channel = item.get(f"{c}_channel")
        if channel is not None:
            array = array[..., int(channel)]
        images[c] = (array, affine)
    label = None
    if item.get("label") is not None:
        array, affine, _ = load_nifti(item["label"], dtype=None)
        if np.issubdtype(array.dtype, np.floating):
            rounded = np.rint(array)
            if not np.allclose(array, rounded, atol=1e-3):
                raise DataError(item["label"], "label volume holds non-integer values")
            array = rounded
        label = (array.astype(np.int16), affine)
    return images, label


def _set_threads(threads: int | None) -> None:
    import SimpleITK as sitk

    if threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))


def process_item(
    item: dict, output: str, out_layout: str, label_scheme: str, config, hdbet_device: str | None = None,
    qc: bool = True, threads: int | None = None,
) -> dict:
    """Load, preprocess and write one case, QC picture, then the record; returns the record."""
    from common.data.layouts import write_case
    from common.preprocess.pipeline import preprocess_case
    from common.viz import save_montage

    _set_threads(threads)
    output = Path(output)
    case_id = item["id"]
    images, label = _load_item(item)
    result = preprocess_case(images, label, config=config, case_id=case_id, hdbet_device=hdbet_device)
    case_dir = output / case_id
    existed = case_dir.exists()
    try:
        written = write_case(
            output, out_layout, case_id, result.images, result.affine, label=result.label,
            label_scheme=label_scheme, grade=item.get("grade"),
        )
        files = sorted(p for p in Path(written).rglob("*.nii*") if p.is_file()) if Path(written).is_dir() else [Path(written)]
        qc_path = None
        if qc:
            qc_path = output / QC_DIR / f"{case_id}.png"
            reg = result.record["registration"]
            save_montage(result.images, qc_path, mask=result.brain_mask,
                         title=f"{case_id}  (brain mask outlined; atlas brain in head {reg['atlas_brain_inside_head']:.0%})")
    except DataError:
        if not existed:
            shutil.rmtree(case_dir, ignore_errors=True)
        raise
    except Exception as exc:
        if not existed:
            shutil.rmtree(case_dir, ignore_errors=True)
        raise DataError(case_id, f"writing the outputs failed ({type(exc).__name__}: {exc})") from exc
    record = dict(result.record)
    record["inputs"] = {k: item.get(k) for k in ("t1n", "t1c", "t2w", "t2f", "label")}
    record["grade"] = item.get("grade")
    record["output_layout"] = out_layout
    record["outputs"] = [str(p.relative_to(output)) for p in files]
    if qc_path is not None:
        record["qc"] = str(qc_path.relative_to(output))
    save_json(record, record_path(output, case_id))  # last: marks the case finished
    return record


def _safe_process(item: dict, *args, **kwargs) -> tuple[str, dict | None, str | None]:
    """Run one case; failures come back as messages (so one bad case never stops the others)."""
    try:
        return item["id"], process_item(item, *args, **kwargs), None
    except DataError as exc:
        message = str(exc)
        if item["id"] not in message:
            message = f"case {item['id']}: {message}"
        return item["id"], None, message
    except Exception as exc:  # noqa: BLE001 - a crash in one case must not lose the others
        return item["id"], None, f"case {item['id']}: unexpected {type(exc).__name__}: {exc}"


def preprocess_dataset(
    input_dir,
    output_dir,
    config=None,
    layout: str | None = None,
    workers: int = 1,
    shard: Any = None,
    overwrite: bool = False,
    qc: bool = True,
    progress: bool = True,
    hdbet_device: str | None = None,
    threads: int | None = None,
) -> RunSummary:
    """Preprocess every case of this shard of ``input_dir`` into ``output_dir`` (BraTS 2023 layout, atlas space)."""
    from tqdm.auto import tqdm

    from common.data.layouts import layout_label_scheme, read_layout
    from common.preprocess.pipeline import PreprocessConfig
    from common.preprocess.skullstrip import resolve_method

    t0 = time.perf_counter()
    config = config if config is not None else PreprocessConfig()
    resolve_method(config.skull_strip)  # fail before any work when HD-BET was asked for and cannot run
    index, count = parse_shard(shard)
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if input_dir.resolve() == output_dir.resolve():
        raise DataError("--output", "must differ from --input (outputs would overwrite the raw scans)")
    if int(workers) < 1:
        raise DataError("--workers", f"must be >= 1, got {workers}")
    check_output(output_dir, "dir", flag="output")
    items = {it["id"]: it for it in read_layout(input_dir, layout=layout, require_label=False)}
    scheme = layout_label_scheme(input_dir, layout)
    out_layout = "brats2024" if scheme == "brats2024" else "brats2023"
    summary = RunSummary(shard=f"{index}/{count}")
    todo = []
    config_dict = config.to_dict()
    for case_id in select_shard(list(items), index, count):
        if not overwrite and is_finished(output_dir, case_id, config_dict):
            summary.skipped.append(case_id)
        else:
            todo.append(items[case_id])
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    args = (str(output_dir), out_layout, scheme, config, hdbet_device, qc, threads)
    bar = tqdm(total=len(todo), desc=f"preprocess {index}/{count}", unit="case", disable=not progress)
    results = []
    if workers <= 1 or len(todo) <= 1:
        for item in todo:
            results.append(_safe_process(item, *args))
            bar.update(1)
    else:
        import multiprocessing

        # spawn: ITK's thread pool does not survive fork()
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_safe_process, item, *args): item["id"] for item in todo}
            for future in as_completed(futures):
                try:
                    results.append(future.result())
                except Exception as exc:  # a worker died (out of memory, signal): report, keep the others
                    results.append((futures[future], None, f"case {futures[future]}: worker process failed "
                                                           f"({type(exc).__name__}: {exc})"))
                bar.update(1)
    bar.close()
    for case_id, record, error in sorted(results, key=lambda r: r[0]):
        if error is None:
            summary.processed.append(case_id)
        else:
            summary.failed[case_id] = error
    summary.seconds = time.perf_counter() - t0
    return summary
