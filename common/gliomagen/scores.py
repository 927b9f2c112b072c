"""The downstream segmentation table of GliomaGen (Fig. 13/14): predicted vs reference label maps of the real test
cases, for each nnU-Net trained on one training set.

Definitions (per-case scores from ``common.metrics.segmentation``; spacings from the reference's header, mm):

* ``kappa``, ``accuracy``: voxel-wise multi-class Cohen's kappa and accuracy on the tumor voxels (the union of
  voxels labelled non-zero in the prediction or the reference), mean over cases; ``kappa_all``/``accuracy_all``
  use every voxel (dominated by background, accuracy near 1).
* ``f1``: per label, from the voxel counts pooled over all cases (2 TP / (2 TP + FP + FN)).
* ``dice``: per label, the mean over cases where the label is in the prediction or the reference (nnU-Net's
  convention: a case where both are empty does not count); ``dice_mean`` averages the labels.
* ``pearson_r``: correlation of predicted and reference volumes (mL) over every (case, label) pair.
* ``hd95``, ``assd``: per label, the mean over cases where both maps have the label (a missed or spurious label
  has no distance; counted in ``unmatched``); the overall values average the labels.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from common.data.labels import get_scheme
from common.io import DataError, load_nifti

_PREFIX = re.compile(r"^(real|syn|aug)_")


def case_scores(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int], spacing: Sequence[float]) -> dict:
    """One case: per-label Dice/HD95/ASSD, voxel counts and volumes, tumor-voxel and all-voxel kappa/accuracy."""
    from common.metrics import cohen_kappa, segmentation_scores

    p, t = np.asarray(pred).astype(np.int64), np.asarray(ref).astype(np.int64)
    scores = segmentation_scores(p, t, labels=list(labels), regions=None, spacing=spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    fg = (p > 0) | (t > 0)
    per_label = {}
    for k in labels:
        pk, tk = p == k, t == k
        s = dict(scores["per_label"][str(k)])
        s.update(tp=int((pk & tk).sum()), fp=int((pk & ~tk).sum()), fn=int((~pk & tk).sum()),
                 volume_pred_ml=float(pk.sum()) * voxel_ml, volume_ref_ml=float(tk.sum()) * voxel_ml,
                 present_pred=bool(pk.any()), present_ref=bool(tk.any()))
        per_label[str(k)] = s
    return {
        "per_label": per_label,
        "kappa": cohen_kappa(p[fg], t[fg]) if fg.any() else 1.0,
        "accuracy": float(np.mean(p[fg] == t[fg])) if fg.any() else 1.0,
        "kappa_all": scores["kappa"],
        "accuracy_all": scores["accuracy"],
    }


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(values)) if values else None


def _pearson(x, y) -> float | None:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def summarise(cases: Mapping[str, dict], names: Mapping[int, str]) -> dict:
    """The paper's table from per-case scores (see the module docstring for every definition)."""
    rows = list(cases.values())
    out: dict = {"n_cases": len(rows)}
    for key in ("kappa", "accuracy", "kappa_all", "accuracy_all"):
        out[key] = _mean(r[key] for r in rows)
    out["f1"], out["dice"], out["hd95_per_label"], out["assd_per_label"], out["pearson_r_per_label"] = {}, {}, {}, {}, {}
    out["unmatched"] = {}
    vp, vr = [], []
    for k, name in names.items():
        s = [r["per_label"][str(k)] for r in rows]
        tp, fp, fn = (sum(x[c] for x in s) for c in ("tp", "fp", "fn"))
        out["f1"][name] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
        out["dice"][name] = _mean(x["dice"] for x in s if x["present_pred"] or x["present_ref"])
        both = [x for x in s if x["present_pred"] and x["present_ref"]]
        out["hd95_per_label"][name] = _mean(x["hd95"] for x in both)
        out["assd_per_label"][name] = _mean(x["assd"] for x in both)
        out["unmatched"][name] = sum(1 for x in s if x["present_pred"] != x["present_ref"])
        out["pearson_r_per_label"][name] = _pearson([x["volume_pred_ml"] for x in s], [x["volume_ref_ml"] for x in s])
        vp += [x["volume_pred_ml"] for x in s]
        vr += [x["volume_ref_ml"] for x in s]
    out["dice_mean"] = _mean(out["dice"].values())
    out["pearson_r"] = _pearson(vp, vr)
    out["hd95"] = _mean(out["hd95_per_label"].values())
    out["assd"] = _mean(out["assd_per_label"].values())
    return out


def _ids(folder: Path) -> dict[str, Path]:
    from common.generation.sources import collect_masks

    out = {}
    for case_id, path in collect_masks(folder):
        out[_PREFIX.sub("", case_id)] = Path(path)
    return out


def score_folders(pred: str | os.PathLike, ref: str | os.PathLike, scheme: str = "brats2024",
                  progress: bool = True) -> dict:
    """Match predicted and reference label files by case id (``-seg``/``_seg`` and nnU-Net's ``real_``/``syn_``/
    ``aug_`` prefixes ignored) and score every pair; each prediction needs a reference on the same grid."""
    from common.data.labels import check_labels

    s = get_scheme(scheme)
    names = {v: c for v, c in s.values.items() if v != 0}
    preds, refs = _ids(Path(pred)), _ids(Path(ref))
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise DataError(pred, f"no prediction for {len(missing)} reference case(s), e.g. {missing[:3]}")
    extra = sorted(set(preds) - set(refs))
    if extra:
        raise DataError(pred, f"{len(extra)} prediction(s) without a reference, e.g. {extra[:3]}")
    from tqdm.auto import tqdm

    cases = {}
    for case_id in tqdm(sorted(refs), desc="score-segmentation", unit="case", disable=not progress):
        t, affine, header = load_nifti(refs[case_id], dtype=None)
        p, p_affine, _ = load_nifti(preds[case_id], dtype=None)
        if p.shape != t.shape:
            raise DataError(preds[case_id], f"shape {p.shape} differs from the reference's {t.shape} ({refs[case_id]})")
        if not np.allclose(p_affine, affine, atol=1e-3):
            raise DataError(preds[case_id], f"affine differs from the reference's ({refs[case_id]})")
        check_labels(p, s, where=preds[case_id])
        check_labels(t, s, where=refs[case_id])
        spacing = [float(z) for z in header.get_zooms()[:3]]
        cases[case_id] = case_scores(p, t, list(names), spacing)
    return {"summary": summarise(cases, names), "cases": cases, "label_scheme": s.name}


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def markdown_table(summary: Mapping, title: str = "model") -> str:
    """The paper's Fig. 13 row (+ Fig. 14's HD95/ASSD) for one model."""
    f1 = summary["f1"]
    head = ["Model", "Kappa", "Accuracy", *[f"F1 ({n})" for n in f1], "Avg Dice", "Pearson's r", "Avg HD95 (mm)",
            "Avg ASSD (mm)"]
    row = [title, _fmt(summary["kappa"]), _fmt(summary["accuracy"]), *[_fmt(v) for v in f1.values()],
           _fmt(summary["dice_mean"]), _fmt(summary["pearson_r"]), _fmt(summary["hd95"]), _fmt(summary["assd"])]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |"]) + "\n"
