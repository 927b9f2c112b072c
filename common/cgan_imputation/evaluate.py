"""Evaluation of Genc et al.'s Figure 5 and the BraSyn protocol: imputed vs real, against the input vs real.

Per scan (``common.metrics.paired_scores``): both images clipped to the 0.5-99.5 percentiles of the brain (the
real target's non-zero voxels) and scaled to [0, 1]; SSIM, PSNR and MAE over the brain and inside the lesion
(tumour label > 0, images zeroed outside it first). The same scores of the *input* contrast (the first source)
against the target are the baseline: imputation is useful where predicted-vs-target beats input-vs-target.
Summaries: mean ± std and the number of scans per metric, and the share of scans where the prediction wins.
The scatter plot draws predicted-vs-target against input-vs-target SSIM per scan (points above the diagonal:
imputation better), one row per model (e.g. without / with the lesion-mask loss), brain and lesion columns.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from common.io import DataError, atomic_path, load_nifti, save_json
from common.metrics import paired_scores

METRICS = ("ssim_brain", "psnr_brain", "mae_brain", "ssim_lesion", "psnr_lesion", "mae_lesion")
LOWER_IS_BETTER = {"mae_brain", "mae_lesion"}


def _volume(value, what: str, case: str) -> np.ndarray:
    if value is None:
        raise DataError(f"case {case}", f"no {what} image")
    if isinstance(value, (str, os.PathLike)):
        data, _, _ = load_nifti(value)
        data = data[..., 0] if data.ndim == 4 and data.shape[-1] == 1 else data
        return data
    return np.asarray(value, dtype=np.float32)


def score_scan(predicted, target, source, label=None, brain=None, case: str = "?") -> dict:
    """``{"predicted": scores, "input": scores}`` of one scan (arrays or NIfTI paths, one grid)."""
    pred, real, src = (_volume(v, w, case) for v, w in ((predicted, "predicted"), (target, "target"), (source, "input")))
    for name, arr in (("predicted", pred), ("input", src)):
        if arr.shape != real.shape:
            raise DataError(f"case {case}", f"{name} shape {arr.shape} differs from the target's {real.shape}")
    lesion = None if label is None else _volume(label, "label", case) > 0
    if lesion is not None and lesion.shape != real.shape:
        raise DataError(f"case {case}", f"label shape {lesion.shape} differs from the target's {real.shape}")
    return {"predicted": paired_scores(pred, real, brain, lesion), "input": paired_scores(src, real, brain, lesion)}


def _stats(values: Sequence[float]) -> dict:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0, "n": int(v.size)}


def evaluate_scans(cases: Sequence[Mapping]) -> dict:
    """``cases``: dicts with ``id``, ``predicted``, ``target``, ``input`` and optionally ``label``/``brain``.

    Returns per-scan scores and, per metric, predicted and input mean ± std with the scan count, and the share of
    scans where the prediction beats the input (``better``; for MAE lower is better).
    """
    if not cases:
        raise ValueError("no scans to evaluate")
    per_scan = []
    for case in cases:
        cid = str(case.get("id", len(per_scan)))
        scores = score_scan(case["predicted"], case["target"], case["input"], case.get("label"), case.get("brain"), cid)
        per_scan.append({"id": cid, **scores})
    summary = {}
    for metric in METRICS:
        pairs = [(s["predicted"].get(metric), s["input"].get(metric)) for s in per_scan]
        pairs = [(p, i) for p, i in pairs if p is not None and i is not None and math.isfinite(p) and math.isfinite(i)]
        if not pairs:
            continue
        wins = [(p < i) if metric in LOWER_IS_BETTER else (p > i) for p, i in pairs]
        summary[metric] = {"predicted": _stats([p for p, _ in pairs]), "input": _stats([i for _, i in pairs]),
                           "better": float(np.mean(wins)), "n_scans": len(pairs)}
    return {"n_scans": len(per_scan), "summary": summary, "per_scan": per_scan}


def pair_cases(real_items: Sequence[Mapping], predicted: str | os.PathLike | Mapping[str, str], source: str,
               target: str) -> list[dict]:
    """Cases for :func:`evaluate_scans`: real items (with the target acquired) + imputed files by case id.

    ``predicted``: a dataset folder written by ``python -m tools impute --output`` or ``{case_id: path}``.
    """
    if isinstance(predicted, Mapping):
        found = dict(predicted)
    else:
        from common.data.layouts import read_layout

        found = {it["id"]: it.get(target) for it in read_layout(predicted, require_label=False)}
    cases = []
    for item in real_items:
        path = found.get(item["id"])
        if not path or not Path(path).exists():
            raise DataError(f"case {item['id']}", f"no imputed {target} found (looked in {predicted})")
        cases.append({"id": item["id"], "predicted": path, "target": item[target], "input": item[source],
                      "label": item.get("label") or None})
    return cases


def score_generator(generator, items: Sequence[Mapping], sources: Sequence[str], target: str, batch: int = 16,
                    device=None, spatial_size: Sequence[int] | None = None) -> dict:
    """Impute every item in memory and evaluate (validation and hyper-parameter search: no files written).

    ``report["summary"]["ssim_brain"]["predicted"]["mean"]`` is the mean validation SSIM the search maximises.
    """
    from common.cgan_imputation.data import SPATIAL_SIZE, apply_chain, volume_transforms
    from common.cgan_imputation.impute import impute_volume

    chain = volume_transforms(tuple(sources), target)
    cases = []
    for item in items:
        data = apply_chain(chain, item)
        pred = impute_volume(generator, data["source"], data["brain"][0], batch=batch, device=device,
                             spatial_size=spatial_size or SPATIAL_SIZE)
        label = load_nifti(item["label"])[0] if item.get("label") else None
        cases.append({"id": item.get("id"), "predicted": pred, "target": data["target"][0].numpy(),
                      "input": data["source"][0].numpy(), "label": label})
    return evaluate_scans(cases)


def scatter_plot(reports: Mapping[str, Mapping], path: str | os.PathLike, title: str | None = None) -> Path:
    """Figure 5: per scan predicted-vs-target SSIM (y) against input-vs-target SSIM (x), diagonal drawn;
    one row per model, columns whole brain and lesion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(reports)
    fig, axes = plt.subplots(len(rows), 2, figsize=(8, 3.8 * len(rows)), squeeze=False)
    for r, name in enumerate(rows):
        per_scan = reports[name]["per_scan"]
        for c, (metric, where) in enumerate((("ssim_brain", "whole brain"), ("ssim_lesion", "tumour lesion"))):
            ax = axes[r][c]
            xs = [s["input"].get(metric) for s in per_scan]
            ys = [s["predicted"].get(metric) for s in per_scan]
            pts = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
            if pts:
                x, y = np.asarray(pts).T
                ax.scatter(x, y, s=18, alpha=0.8)
                lo = max(-1.0, float(min(x.min(), y.min())) - 0.05)  # zoom on the scans, diagonal across
                hi = min(1.0, float(max(x.max(), y.max())) + 0.02)
                ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
                ax.set_xlim(lo, hi)
                ax.set_ylim(lo, hi)
                stats = reports[name]["summary"].get(metric, {})
                pm, im = stats.get("predicted", {}), stats.get("input", {})
                ax.set_title(f"{name}: {where}\npredicted {pm.get('mean', 0):.3f} ± {pm.get('std', 0):.3f}, "
                             f"input {im.get('mean', 0):.3f} ± {im.get('std', 0):.3f} (n={len(pts)})", fontsize=8)
            else:
                ax.set_title(f"{name}: {where} (no scan with a lesion)", fontsize=8)
            ax.set_xlabel("SSIM input vs target")
            ax.set_ylabel("SSIM predicted vs target")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


def write_report(reports: Mapping[str, Mapping], out_dir: str | os.PathLike, title: str | None = None) -> dict:
    """``out_dir/evaluation.json`` (every model's per-scan scores and summary) + ``ssim_scatter.png``."""
    out_dir = Path(out_dir)
    json_path = save_json({"title": title, "models": dict(reports)}, out_dir / "evaluation.json")
    png = scatter_plot(reports, out_dir / "ssim_scatter.png", title)
    return {"json": str(json_path), "scatter": str(png)}


def evaluate_imputed(datalist: str | os.PathLike, predicted: Mapping[str, str | os.PathLike], source: str, target: str,
                     out_dir: str | os.PathLike, section: str = "validation", title: str | None = None) -> dict:
    """What a bundle's evaluate config calls: the real cases of ``section`` of a datalist against one imputed
    dataset per model (``{"without mask loss": dir, "with mask loss": dir}``) -> report JSON + scatter PNG."""
    from common.data.datalist import load_datalist

    items = load_datalist(datalist, section)
    reports = {name: evaluate_scans(pair_cases(items, folder, source, target)) for name, folder in predicted.items()}
    paths = write_report(reports, out_dir, title or f"{source} -> {target}")
    return {"reports": reports, **paths}
