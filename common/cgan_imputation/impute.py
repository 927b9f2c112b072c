"""Volume imputation: a missing contrast from the acquired ones, slice by slice, written on the source's grid.

Each case: the sources are loaded and normalised as in training (:func:`common.cgan_imputation.data.volume_transforms`),
cut into axial slices, run through the generator ``batch`` slices at a time (each slice zero-padded to the training
size and to a multiple the generator accepts, then cropped back), stacked back in 3-D, clamped to [0, 1] and zeroed
outside the brain (voxels where every source is 0). The result is written in the case's BraTS naming (the path the
layout expects for the target, e.g. ``BraTS-GLI-00000-000-t2f.nii.gz``) with the first source's affine and header,
atomically, next to a JSON sidecar (same stem) marking it synthetic with the model, weights hash, settings and seed.

Intensities of the written volume are in the normalised [0, 1] units (the target's 0.5-99.5 % brain percentiles
as 0 and 1): MRI intensities have no absolute scale, and every bundle normalises its inputs the same way.

Safety: every case is planned before anything is written; a target file that already exists (acquired, or an
earlier imputation) is a ``DataError`` naming it unless ``overwrite`` (or ``skip_existing``) is given.
"""

from __future__ import annotations

import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from common.cgan_imputation.data import AXIAL, SPATIAL_SIZE, apply_chain, check_item, check_task, volume_transforms
from common.cgan_imputation.networks import ResnetGenerator, generator_config_from_state
from common.io import DataError, check_output, open_nifti, save_json, save_nifti, torch_load, torch_save

SIDECAR_SUFFIX = ".json"


# ----------------------------------------------------------------------------------------------- weights
def save_generator(generator: ResnetGenerator, path: str | os.PathLike, sources: Sequence[str] | None = None,
                   target: str | None = None, spatial_size: Sequence[int] = SPATIAL_SIZE, **extra: Any) -> Path:
    """Weights + what is needed to rebuild and use them (constructor arguments, task, training slice size)."""
    state = {"generator": generator.state_dict(), "generator_config": dict(generator.config),
             "spatial_size": list(spatial_size)}
    if sources is not None:
        state["sources"] = list(sources)
    if target is not None:
        state["target"] = target
    state.update(extra)
    return torch_save(state, path)


def load_generator(weights: str | os.PathLike, device: str | torch.device = "cpu", key: str | None = None,
                   output: str | None = None) -> tuple[ResnetGenerator, dict]:
    """-> (generator in eval mode, info). Reads our own files, trainer checkpoints (``generator``/``network``
    entry) and bare state dicts (architecture read off the weights; ``output`` then says linear or tanh)."""
    state = torch_load(weights)
    info: dict[str, Any] = {}
    if isinstance(state, dict) and key is None:
        key = next((k for k in ("generator", "network", "model", "state_dict") if isinstance(state.get(k), dict)), None)
    if key is not None:
        if key not in state:
            raise DataError(weights, f"no entry {key!r} in the checkpoint (has {sorted(state)[:8]})")
        # the task, slice size and generator arguments saved beside the weights (other networks' states dropped)
        info = {k: v for k, v in state.items() if k == "generator_config" or (k != key and not isinstance(v, dict))}
        state = state[key]
    try:
        config = dict(info.get("generator_config") or generator_config_from_state(state))
    except ValueError as exc:
        raise DataError(weights, f"{exc}; fix: pass pix2pix ResnetGenerator weights") from exc
    if output is not None:
        config["output"] = output
    generator = ResnetGenerator(**config)
    try:
        generator.load_state_dict(state)
    except RuntimeError as exc:
        raise DataError(weights, f"weights do not fit a ResnetGenerator({config}) ({str(exc)[:300]})") from exc
    info["generator_config"] = config
    return generator.to(device).eval(), info


# ----------------------------------------------------------------------------------------------- one volume
def _pad_amounts(size: int, wanted: int, multiple: int) -> tuple[int, int]:
    total = max(size, wanted)
    total = -(-total // multiple) * multiple
    return (total - size) // 2, total - size - (total - size) // 2


@torch.no_grad()
def impute_volume(generator: torch.nn.Module, source, brain=None, batch: int = 16, axis: int = AXIAL,
                  spatial_size: Sequence[int] = SPATIAL_SIZE, device: str | torch.device | None = None,
                  amp_dtype: torch.dtype | None = None, skip_empty: bool = True) -> np.ndarray:
    """Normalised sources ``(S, X, Y, Z)`` -> imputed target ``(X, Y, Z)`` in [0, 1] (float32).

    ``batch`` slices per forward pass; ``brain`` (X, Y, Z) zeroes the background (default: any source != 0);
    ``amp_dtype`` (e.g. ``torch.bfloat16``) runs the generator under autocast; ``skip_empty`` leaves slices
    without brain out of the forward passes (they are zero in the output either way).
    """
    if batch < 1:
        raise DataError("--batch", f"must be >= 1, got {batch}")
    device = torch.device(device) if device is not None else next(generator.parameters()).device
    src = torch.as_tensor(np.asarray(source) if not isinstance(source, torch.Tensor) else source).float()
    if src.ndim != 4:
        raise ValueError(f"source must be (S, X, Y, Z), got shape {tuple(src.shape)}")
    in_channels = getattr(generator, "config", {}).get("in_channels", src.shape[0])
    if src.shape[0] != in_channels:
        raise ValueError(f"generator takes {in_channels} source contrast(s), got {src.shape[0]}")
    mask = (src != 0).any(0) if brain is None else torch.as_tensor(np.asarray(brain)).bool()
    if mask.shape != src.shape[1:]:
        raise ValueError(f"brain mask shape {tuple(mask.shape)} differs from the source's {tuple(src.shape[1:])}")
    slices = src.movedim(axis + 1, 0).to(device)  # (N, S, H, W); one transfer per volume, not per batch
    h, w = slices.shape[2:]
    # slices without brain come out as zeros anyway (the output is masked): skip them
    keep = mask.movedim(axis, 0).flatten(1).any(1).nonzero()[:, 0] if skip_empty else torch.arange(slices.shape[0])
    multiple = getattr(generator, "multiple", 4)
    (t, b), (l, r) = _pad_amounts(h, spatial_size[0], multiple), _pad_amounts(w, spatial_size[1], multiple)
    out = torch.zeros((slices.shape[0], h, w), dtype=torch.float32, device=device)
    keep = keep.to(device)
    was_training = generator.training
    generator.eval()
    try:
        for i in range(0, len(keep), batch):
            idx = keep[i:i + batch]
            x = F.pad(slices[idx], (l, r, t, b)).to(device)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                y = generator(x)
            out[idx] = y[:, 0, t:t + h, l:l + w].float()
    finally:
        generator.train(was_training)
    volume = out.movedim(0, axis).clamp_(0, 1).cpu()
    return (volume * mask).numpy().astype(np.float32)


# ----------------------------------------------------------------------------------------------- cases
def read_cases(input_path: str | os.PathLike) -> tuple[list[dict], Path]:
    """A dataset folder (every case) or one case folder -> (canonical items, dataset root)."""
    from common.data.layouts import detect_layout, read_layout

    path = Path(input_path).resolve()
    if not path.is_dir():
        raise DataError(path, "input does not exist or is not a folder; fix: give a case folder or a dataset folder")
    is_case = any(p.name.endswith((".nii", ".nii.gz")) for p in path.iterdir() if p.is_file())
    root = path.parent if is_case else path
    if detect_layout(root) == "msd":
        raise DataError(root, "MSD keeps all contrasts in one 4-D file; fix: write the cases in a BraTS layout first")
    items = read_layout(root, require_label=False)
    if is_case:
        items = [it for it in items if it["id"] == path.name]
        if not items:
            raise DataError(path, "not a case folder of a known layout; fix: name it as the layout does")
    return items, root


def _target_path(item: Mapping, target: str, root: Path, output: Path | None) -> Path:
    source_path = Path(item[next(c for c in ("t1n", "t1c", "t2w", "t2f") if item.get(c))])
    expected = Path(item[target]) if item.get(target) else source_path.parent / f"{item['id']}-{target}.nii.gz"
    if output is None:
        return expected
    return output / expected.parent.relative_to(root) / expected.name


def sidecar_path(image_path: str | os.PathLike) -> Path:
    p = Path(image_path)
    stem = p.name[: -len(".nii.gz")] if p.name.endswith(".nii.gz") else p.stem
    return p.with_name(stem + SIDECAR_SUFFIX)


def plan_cases(items: Sequence[Mapping], sources: Sequence[str], target: str, root: Path,
               output: str | os.PathLike | None = None, overwrite: bool = False,
               skip_existing: bool = False) -> list[dict]:
    """Check every case before anything is written -> [{item, out, sidecar, skip}]; ``DataError`` on the first
    missing source or existing target (naming the file)."""
    out_root = Path(output).resolve() if output is not None else None
    plans = []
    for item in items:
        check_item(item, sources)
        out = _target_path(item, target, root, out_root)
        exists = out.exists()
        if exists and not (overwrite or skip_existing):
            what = "an earlier imputation" if sidecar_path(out).exists() else "an acquired scan"
            raise DataError(out, f"already exists ({what}); nothing was written; fix: --overwrite to replace it, "
                                 "--skip_existing to leave such cases alone, or --output elsewhere")
        plans.append({"item": dict(item), "out": out, "sidecar": sidecar_path(out), "skip": exists and skip_existing})
    return plans


def _copy_case(item: Mapping, root: Path, out_root: Path, target: str) -> None:
    """With ``--output``: the case's other files go beside the imputed one, so the output is a whole dataset."""
    for key in ("t1n", "t1c", "t2w", "t2f", "label"):
        if key == target or not item.get(key) or not Path(item[key]).exists():
            continue
        src = Path(item[key])
        dst = out_root / src.parent.relative_to(root) / src.name
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    for name in ("grades.csv", "labels.json", "name_mapping.csv"):
        if (root / name).exists() and not (out_root / name).exists():
            shutil.copy2(root / name, out_root / name)


def impute_dataset(input_path: str | os.PathLike, weights: str | os.PathLike | torch.nn.Module,
                   source: str | Sequence[str] = "t2w", target: str = "t2f", output: str | os.PathLike | None = None,
                   batch: int = 16, device: str | None = None, overwrite: bool = False, skip_existing: bool = False,
                   seed: int = 0, amp_dtype: torch.dtype | None = None, spatial_size: Sequence[int] | None = None,
                   model: str | None = None, progress: bool = True) -> list[dict]:
    """Impute ``target`` for every case under ``input_path`` (a dataset or one case); returns one record per case.

    ``weights``: a weights file (see :func:`load_generator`) or a built generator. Outputs go into the case
    folders (default) or, with ``output``, into a copy of the dataset there.
    """
    from tqdm import tqdm

    sources, target = check_task(source, target)
    if int(batch) < 1:
        raise DataError("--batch", f"must be >= 1, got {batch}")
    if output is not None:
        check_output(output, "dir", flag="output")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    info: dict[str, Any] = {}
    if isinstance(weights, torch.nn.Module):
        generator, weights_id = weights.to(device).eval(), None
        info["generator_config"] = getattr(weights, "config", None)
    else:
        generator, info = load_generator(weights, device)
        from common.bundle.release import file_hash

        weights_id = {"path": str(Path(weights).resolve()), "sha256": file_hash(weights)}
        trained = (info.get("sources"), info.get("target"))
        if trained[0] is not None and (tuple(trained[0]) != sources or trained[1] != target):
            raise DataError(weights, f"trained for {'+'.join(trained[0])} -> {trained[1]}, asked "
                                     f"{'+'.join(sources)} -> {target}; fix: use that task's weights")
    n_in = (info.get("generator_config") or {}).get("in_channels", len(sources))
    if n_in != len(sources):
        raise DataError(weights if not isinstance(weights, torch.nn.Module) else "--weights",
                        f"the generator takes {n_in} source contrast(s), --source gives {len(sources)} {sources}")
    spatial_size = tuple(spatial_size or info.get("spatial_size") or SPATIAL_SIZE)

    items, root = read_cases(input_path)
    plans = plan_cases(items, sources, target, root, output, overwrite, skip_existing)
    load = volume_transforms(sources, None)
    torch.manual_seed(seed)
    records = []
    for plan in tqdm(plans, desc=f"impute {target}", unit="case", disable=not progress):
        item, out = plan["item"], plan["out"]
        if plan["skip"]:
            records.append({"id": item["id"], "output": str(out), "skipped": "target exists"})
            continue
        start = time.perf_counter()
        data = apply_chain(load, item)
        volume = impute_volume(generator, data["source"], data["brain"][0], batch=batch, device=device,
                               spatial_size=spatial_size, amp_dtype=amp_dtype)
        seconds = time.perf_counter() - start
        first = Path(item[sources[0]])
        ref = open_nifti(first)  # header and affine only: the voxels were read by ``load``
        affine, header = ref.affine, ref.header
        sidecar = {
            "synthetic": True,
            "method": "pix2pix cGAN imputation (Genc et al., ISMRM 2022)",
            "model": model or (Path(weights).name if weights_id else type(generator).__name__),
            "weights": weights_id,
            "generator_config": info.get("generator_config"),
            "sources": {c: str(Path(item[c]).resolve()) for c in sources},
            "target": target,
            "grid_of": str(first.resolve()),
            "settings": {"batch": batch, "axis": AXIAL, "spatial_size": list(spatial_size), "device": str(device),
                         "amp": str(amp_dtype) if amp_dtype else None,
                         "intensity": "[0, 1]: 0.5-99.5 % brain percentiles, zero outside the sources' brain"},
            "seed": seed,
            "seconds": round(seconds, 3),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if output is not None:
            _copy_case(item, root, Path(output).resolve(), target)
        save_json(sidecar, plan["sidecar"])  # sidecar first: a volume never appears without its synthetic mark
        try:
            save_nifti(volume, affine, out, header=header, dtype=np.float32)
        except BaseException:
            plan["sidecar"].unlink(missing_ok=True)
            raise
        records.append({"id": item["id"], "output": str(out), "sidecar": str(plan["sidecar"]), "seconds": seconds})
    return records
