"""Binary classification scores for downstream tasks (the VQGAN paper's LGG/HGG table): AUC, F1, accuracy,
precision, recall, computed with MONAI's ``compute_roc_auc`` and confusion-matrix metrics."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def classification_scores(y_true: Sequence[int], y_score: Sequence[float], threshold: float = 0.5,
                          zero_division: float = 0.0) -> dict:
    """``y_true`` in {0, 1} (e.g. LGG=0, HGG=1), ``y_score`` the predicted probability of class 1.

    A ratio with nothing to count (precision when no case is predicted positive, recall when there is no
    positive case, F1 when both) is 0/0: MONAI returns NaN, scikit-learn 0 with a warning. Here it is
    ``zero_division`` (0 by default, as scikit-learn's ``zero_division=0``), and the output says which
    scores it replaced (``zero_division_used``).
    """
    from monai.metrics import compute_roc_auc
    from monai.metrics.confusion_matrix import compute_confusion_matrix_metric, get_confusion_matrix

    y = np.asarray(y_true).astype(np.int64).ravel()
    s = np.asarray(y_score, dtype=np.float64).ravel()
    if y.shape != s.shape or y.size == 0:
        raise ValueError(f"need one score per label, got {y.size} labels and {s.size} scores")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, found {sorted(set(y.tolist()))}")
    auc = float(compute_roc_auc(torch.as_tensor(s), torch.as_tensor(y))) if len(set(y.tolist())) == 2 else float("nan")
    pred = torch.as_tensor((s >= threshold).astype(np.float32))[:, None]
    conf = get_confusion_matrix(pred, torch.as_tensor(y, dtype=torch.float32)[:, None]).sum(0)
    names = {"f1": "f1 score", "accuracy": "accuracy", "precision": "precision", "recall": "sensitivity"}
    out = {"auc": auc}
    replaced = []
    for key, name in names.items():
        value = float(compute_confusion_matrix_metric(name, conf).item())
        if np.isnan(value) and key != "accuracy":
            value = float(zero_division)
            replaced.append(key)
        out[key] = value
    tp, fp = (float(v) for v in conf.flatten()[:2])  # [tp, fp, tn, fn]
    out.update(n=int(y.size), n_positive=int(y.sum()), n_predicted_positive=int(tp + fp), threshold=threshold,
               zero_division=zero_division, zero_division_used=replaced)
    return out
