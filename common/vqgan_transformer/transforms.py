"""Data chain of the VQGAN + masked transformer bundle: FLAIR tumour ROIs with their grade as the class.

The ROI itself is :class:`common.data.transforms.TumorROId` (a box centred on the tumour, zero-padded where it
leaves the volume, multiplied by the binarised segmentation, scaled to [-1, 1]); this module adds the grade ->
class index step, the composed chain and the poster's workflow picture (volume -> crop -> mask -> ROI).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from monai.transforms import Compose, MapTransform

from common.data.transforms import LoadCanonicald, TumorROId
from common.io import DataError, check_bool
from common.vqgan_transformer.networks import CLASSES

__all__ = ["GradeLabeld", "roi_transforms", "save_roi_workflow", "save_importance_maps"]


class GradeLabeld(MapTransform):
    """``grade`` ("HGG"/"LGG", any case) -> ``class`` (``CLASSES`` index: LGG 0, HGG 1) as a long tensor.

    A case without a grade is a ``DataError`` when ``required`` (class-conditional training cannot use it);
    otherwise it gets ``missing_value`` (e.g. -1 for unconditional use).
    """

    def __init__(self, grade_key: str = "grade", class_key: str = "class", required: bool = True,
                 missing_value: int = -1):
        super().__init__([grade_key])
        self.grade_key = grade_key
        self.class_key = class_key
        self.required = check_bool("require_grade", required)
        self.missing_value = int(missing_value)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        grade = d.get(self.grade_key)
        text = "" if grade is None else str(grade).strip().upper()
        case = d.get("id") or "?"
        if not text:
            if self.required:
                raise DataError(f"case {case}", "has no grade (HGG/LGG): class-conditional training needs one; "
                                "use a layout that records it (BraTS 2019 HGG/LGG folders, BraTS 2020 mapping "
                                "CSV, grades.csv) or add a 'grade' to the datalist item")
            d[self.class_key] = torch.tensor(self.missing_value, dtype=torch.long)
            return d
        if text not in CLASSES:
            raise DataError(f"case {case}", f"grade {grade!r} is not one of {', '.join(CLASSES)}")
        d[self.class_key] = torch.tensor(CLASSES.index(text), dtype=torch.long)
        return d


def roi_transforms(roi_size: Sequence[int] = (128, 128, 128), contrast: str = "t2f", require_grade: bool = True,
                   percentiles: tuple[float, float] = (0.0, 100.0)) -> Compose:
    """Canonical datalist item -> ``{"image": [1, *roi_size] in [-1, 1], "label": cropped seg,
    "class": 0/1, ...}`` (the paper's FLAIR ROI, 128^3 by default)."""
    return Compose([
        GradeLabeld(required=require_grade),  # first: a case without a grade fails before anything is read
        LoadCanonicald(contrasts=(contrast,)),
        TumorROId("image", label_key="label", roi_size=roi_size, percentiles=percentiles),
    ])


def save_roi_workflow(item: Mapping, path: str | os.PathLike, roi_size: Sequence[int] = (128, 128, 128),
                      contrast: str = "t2f") -> Path:
    """The poster's preprocessing workflow for one case as a PNG: FLAIR volume -> crop -> binarised mask -> ROI.

    Panels are drawn in the volume's frame (the crop box shown in place) through the tumour's centre, with the
    tumour outlined; the ROI is the transform's actual output put back into the box.
    """
    from common.viz import save_montage

    loaded = LoadCanonicald(contrasts=(contrast,))(item)
    volume = np.asarray(loaded["image"][0], dtype=np.float32)
    label = np.asarray(loaded["label"][0])
    roi = TumorROId("image", roi_size=roi_size)(loaded)
    mask = label > 0
    coords = np.argwhere(mask)
    center = (coords.min(0) + coords.max(0) + 1) // 2
    start = center - np.asarray(roi_size) // 2
    box = tuple(slice(max(0, s), min(n, s + r)) for s, r, n in zip(start, roi_size, volume.shape))
    inner = tuple(slice(b.start - s, b.stop - s) for b, s in zip(box, start))
    crop = np.zeros_like(volume)
    crop[box] = volume[box]
    roi_frame = np.full_like(volume, -1.0)
    roi_frame[box] = np.asarray(roi["image"][0])[inner]
    affine = np.asarray(loaded["image"].affine)
    case = item.get("id", "")
    grade = item.get("grade") or "no grade"
    name = {"t2f": "FLAIR", "t1n": "T1", "t1c": "T1c", "t2w": "T2"}.get(contrast, contrast)
    panels = {f"{name} volume": volume, f"crop {'x'.join(map(str, roi_size))}": crop,
              "binarised segmentation": mask.astype(np.float32), "ROI = crop x mask, [-1, 1]": roi_frame}
    return save_montage(panels, path, mask=mask, title=f"{case} ({grade}): ROI workflow",
                        center=[int(c) for c in np.clip(center, 0, np.asarray(volume.shape) - 1)], affine=affine)


def save_importance_maps(vqgan, rois, classes: Sequence[str], path: str | os.PathLike) -> Path:
    """The poster's importance-score pictures: each ROI beside its token score map (trilinear to the ROI grid,
    scaled to [0, 1] per ROI), middle slices through the ROI centre. ``rois``: tensor ``[B, 1, *spatial]``."""
    import torch.nn.functional as F

    from common.viz import save_montage

    x = torch.as_tensor(rois).float()
    device = next(vqgan.parameters()).device
    _, importance = vqgan.tokens(x.to(device))
    score = F.interpolate(importance[:, None].float().cpu(), size=tuple(x.shape[2:]), mode="trilinear",
                          align_corners=False)[:, 0]
    panels = {}
    for i, cls in enumerate(classes):
        s = score[i] - score[i].min()
        panels[f"{cls} ROI #{i}"] = x[i, 0].numpy()
        panels[f"{cls} importance #{i}"] = (s / s.max().clamp_min(1e-12)).numpy()
    return save_montage(panels, path, title="importance score maps (stage-1 head)")
