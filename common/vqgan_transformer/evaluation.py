"""The poster's evaluation: per-class MMD and MS-SSIM (ablation table), and the downstream LGG/HGG ROI
classification (a classifier pretrained on synthetic ROIs and fine-tuned on a small real set, against real
only; AUC, F1, accuracy, precision, recall as mean +- std over folds).

Metrics come from :mod:`common.metrics`; the classifier is MONAI's ``Classifier`` trained with MONAI's
``SupervisedTrainer``. ROIs are arrays ``[1, X, Y, Z]`` (or ``[X, Y, Z]``) in [-1, 1]; labels are ``CLASSES``
indices (LGG 0, HGG 1).
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np
import torch

from common.vqgan_transformer.networks import CLASSES

__all__ = ["per_class_quality", "build_roi_classifier", "train_classifier", "predict_hgg",
           "stratified_folds", "downstream_classification", "summarise", "roi_statistics", "statistic_separability",
           "phantom_grade_separability", "compare_decoders", "class_adherence"]

SCORES = ("auc", "f1", "accuracy", "precision", "recall")


def _volume(x) -> np.ndarray:
    v = np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
    return v[0] if v.ndim == 4 else v


def per_class_quality(real: Mapping[str, Sequence], synthetic: Mapping[str, Sequence], seed: int = 0) -> dict:
    """Per class: MMD(real, synthetic) (MONAI ``MMDMetric`` via ``common.metrics.image_mmd``) and the mean
    pairwise MS-SSIM among the synthetic ROIs (diversity; the real set's value beside it as the reference).

    MS-SSIM is computed on ROIs mapped from [-1, 1] to [0, 1] (data range 1). Sample counts are reported.
    """
    from common.metrics import image_mmd, ms_ssim_diversity

    out = {}
    for cls in synthetic:
        if cls not in real:
            raise ValueError(f"class {cls!r} has synthetic ROIs but no real ones to compare with")
        r = [_volume(v) for v in real[cls]]
        s = [_volume(v) for v in synthetic[cls]]
        unit = lambda vols: [(v + 1.0) / 2.0 for v in vols]  # noqa: E731
        out[cls] = {
            "mmd": image_mmd(r, s, seed=seed),
            "ms_ssim_synthetic": ms_ssim_diversity({cls: unit(s)}),
            "ms_ssim_real": ms_ssim_diversity({cls: unit(r)}),
            "n_real": len(r),
            "n_synthetic": len(s),
        }
    return out


def build_roi_classifier(spatial_size: Sequence[int], channels: Sequence[int] = (16, 32, 64, 128),
                         strides: Sequence[int] | None = None, dropout: float = 0.1,
                         norm: str | None = "instance") -> torch.nn.Module:
    """MONAI ``Classifier`` (residual conv encoder + linear) with 2 outputs (LGG, HGG) for ``[1, *spatial]``.

    Instance norm (MONAI's default) by default: batch norm's running statistics are poor after the few
    iterations of a small fine-tuning set and skew the held-out predictions.
    """
    from monai.networks.nets import Classifier

    strides = tuple(strides) if strides is not None else (2,) * len(channels)
    return Classifier(in_shape=(1, *spatial_size), classes=len(CLASSES), channels=tuple(channels),
                      strides=strides, dropout=dropout, norm=norm)


def _loader(images: Sequence, labels: Sequence[int], batch_size: int, shuffle: bool, seed: int):
    from monai.data import DataLoader

    data = [{"image": torch.as_tensor(_volume(x))[None], "label": torch.tensor(int(y))}
            for x, y in zip(images, labels)]
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, num_workers=0,
                      generator=torch.Generator().manual_seed(seed))


def train_classifier(network: torch.nn.Module, images: Sequence, labels: Sequence[int], epochs: int,
                     lr: float = 1e-3, batch_size: int = 4, device="cpu", seed: int = 0,
                     flip: bool = True) -> torch.nn.Module:
    """Cross-entropy training with MONAI's ``SupervisedTrainer`` (random flips as augmentation)."""
    from monai.engines import SupervisedTrainer

    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(f"need one label per ROI and at least one ROI, got {len(images)} and {len(labels)}")
    if int(epochs) < 1:
        return network.to(device)
    device = torch.device(device)
    network = network.to(device)
    gen = torch.Generator().manual_seed(seed)

    def prepare(batch, device=None, non_blocking=False, **kwargs):
        x = batch["image"].to(device)
        if flip:
            for axis in range(2, x.ndim):
                if bool(torch.rand((), generator=gen) < 0.5):
                    x = x.flip(axis)
        return x, batch["label"].to(device).long()

    trainer = SupervisedTrainer(
        device=device, max_epochs=int(epochs), train_data_loader=_loader(images, labels, batch_size, True, seed),
        network=network, optimizer=torch.optim.Adam(network.parameters(), lr=lr),
        loss_function=torch.nn.CrossEntropyLoss(), prepare_batch=prepare,
    )
    trainer.logger.setLevel(logging.WARNING)
    trainer.run()
    return network


@torch.no_grad()
def predict_hgg(network: torch.nn.Module, images: Sequence, device="cpu", batch_size: int = 8) -> np.ndarray:
    """Probability of HGG for each ROI."""
    network = network.to(device).eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.stack([torch.as_tensor(_volume(v))[None] for v in images[start:start + batch_size]]).to(device)
        out.append(torch.softmax(network(x).float(), -1)[:, CLASSES.index("HGG")].cpu())
    return torch.cat(out).numpy()


def stratified_folds(labels: Sequence[int], folds: int, seed: int = 0) -> list[int]:
    """Fold index per case, each class dealt round-robin after a seeded shuffle (every fold gets both classes
    when each class has at least ``folds`` cases)."""
    labels = [int(y) for y in labels]
    counts = {c: labels.count(c) for c in set(labels)}
    if int(folds) < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if len(counts) < 2 or min(counts.values()) < int(folds):
        raise ValueError(f"need at least {folds} cases of each class for {folds} folds, have "
                         f"{ {CLASSES[c]: n for c, n in sorted(counts.items())} }")
    rng = np.random.default_rng(seed)
    fold = [0] * len(labels)
    position = 0
    for c in sorted(counts):
        idx = [i for i, y in enumerate(labels) if y == c]
        rng.shuffle(idx)
        for i in idx:
            fold[i] = position % int(folds)
            position += 1
    return fold


def summarise(per_fold: Sequence[dict]) -> dict:
    """mean +- std over folds of each score (NaN AUCs of single-class folds are left out and counted)."""
    out = {}
    for key in SCORES:
        values = np.asarray([f[key] for f in per_fold], dtype=np.float64)
        finite = values[np.isfinite(values)]
        out[key] = {"mean": float(finite.mean()) if finite.size else None,
                    "std": float(finite.std()) if finite.size else None, "n": int(finite.size)}
    return out


def downstream_classification(real_images: Sequence, real_labels: Sequence[int],
                              synthetic_images: Sequence | None = None, synthetic_labels: Sequence[int] | None = None,
                              folds: int = 5, real_train_fraction: float = 1.0, pretrain_epochs: int = 20,
                              finetune_epochs: int = 10, real_epochs: int | None = None, lr: float = 1e-3,
                              batch_size: int = 4, channels: Sequence[int] = (16, 32, 64, 128), seed: int = 0,
                              device=None, progress: bool = True) -> dict:
    """The poster's downstream table: per fold of the real cases, a classifier trained on real only
    (``real_epochs``, default pretrain + finetune epochs) against one pretrained on the synthetic ROIs and
    fine-tuned on the same real training cases (``real_train_fraction`` of the fold's training cases: the
    "small real set"); both scored on the held-out real fold. Returns per-fold scores and mean +- std.
    Without synthetic ROIs only the real-only row is computed (e.g. to check that the classes are separable).
    """
    from tqdm.auto import tqdm

    from common.metrics import classification_scores

    if (synthetic_images is None) != (synthetic_labels is None):
        raise ValueError("give both synthetic_images and synthetic_labels, or neither")
    if not 0.0 < real_train_fraction <= 1.0:
        raise ValueError(f"real_train_fraction must be in (0, 1], got {real_train_fraction}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    labels = [int(y) for y in real_labels]
    fold_of = stratified_folds(labels, folds, seed)
    spatial = _volume(real_images[0]).shape
    real_epochs = int(pretrain_epochs + finetune_epochs) if real_epochs is None else int(real_epochs)
    variants = {"real_only": []}
    if synthetic_images is not None:
        variants["synthetic_pretrained_finetuned"] = []
    for k in tqdm(range(int(folds)), desc="downstream folds", disable=not progress):
        test = [i for i, f in enumerate(fold_of) if f == k]
        train = [i for i, f in enumerate(fold_of) if f != k]
        if real_train_fraction < 1.0:
            keep = stratified_folds([labels[i] for i in train], max(2, round(1 / real_train_fraction)), seed + k)
            train = [i for i, f in zip(train, keep) if f == 0]
        x_train, y_train = [real_images[i] for i in train], [labels[i] for i in train]
        x_test, y_test = [real_images[i] for i in test], [labels[i] for i in test]
        torch.manual_seed(seed + k)
        net = build_roi_classifier(spatial, channels)
        train_classifier(net, x_train, y_train, real_epochs, lr, batch_size, device, seed + k)
        variants["real_only"].append(classification_scores(y_test, predict_hgg(net, x_test, device)))
        if synthetic_images is not None:
            torch.manual_seed(seed + k)
            net = build_roi_classifier(spatial, channels)
            train_classifier(net, synthetic_images, synthetic_labels, pretrain_epochs, lr, batch_size, device,
                             seed + k)
            train_classifier(net, x_train, y_train, finetune_epochs, lr, batch_size, device, seed + k)
            variants["synthetic_pretrained_finetuned"].append(
                classification_scores(y_test, predict_hgg(net, x_test, device)))
    return {
        "folds": int(folds), "n_real": len(labels), "n_real_train_per_fold": len(train),
        "n_synthetic": 0 if synthetic_images is None else len(synthetic_images),
        "per_fold": variants, "summary": {name: summarise(rows) for name, rows in variants.items()},
    }


ROI_STATISTICS = ("mean", "std", "p10", "p50", "p90", "centre_minus_rim", "log_voxels")


def roi_statistics(roi) -> np.ndarray:
    """Simple statistics of a ROI inside its mask (voxels > -1): intensity moments and percentiles, the mean of
    the inner 40 % (by depth) minus the rest (a dark necrotic centre makes it negative) and the log size."""
    from scipy import ndimage as ndi

    v = _volume(roi)
    mask = v > -1.0
    values = v[mask]
    if values.size < 2:
        raise ValueError("ROI has fewer than 2 tumour voxels")
    depth = ndi.distance_transform_edt(mask)
    inner = mask & (depth > np.percentile(depth[mask], 60))
    rim = mask & ~inner
    centre = float(v[inner].mean() - v[rim].mean()) if inner.any() and rim.any() else 0.0
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return np.asarray([values.mean(), values.std(), p10, p50, p90, centre, np.log(values.size)], np.float64)


def statistic_separability(rois: Sequence, labels: Sequence[int], folds: int = 4, seed: int = 0) -> dict:
    """Cross-validated nearest-centroid classification on z-scored :func:`roi_statistics`: a check of whether two
    classes of ROIs differ at all that needs no training (mean +- std of the scores over folds)."""
    from common.metrics import classification_scores

    x = np.stack([roi_statistics(r) for r in rois])
    y = np.asarray([int(v) for v in labels])
    fold_of = np.asarray(stratified_folds(y.tolist(), folds, seed))
    rows = []
    for k in range(int(folds)):
        train, test = fold_of != k, fold_of == k
        rows.append(classification_scores(y[test], _centroid_scores(x[train], y[train], x[test])))
    return {"features": list(ROI_STATISTICS), "per_fold": rows, **summarise(rows)}


def phantom_grade_separability(n: int = 32, shape: Sequence[int] = (64, 64, 40), roi_size: Sequence[int] = (32, 32, 32),
                               folds: int = 4, epochs: int = 30, channels: Sequence[int] = (8, 16, 32), seed: int = 0,
                               classifier: bool = True, workdir=None, device="cpu") -> dict:
    """Are the phantoms' FLAIR ROIs of the two grades separable at all? ``n`` phantom cases on a small grid ->
    the ROI chain -> ``folds``-fold CV of (a) :func:`statistic_separability` and (b) with ``classifier`` the
    downstream CNN trained on these (real) ROIs only.

    Class conditioning can only be shown on data whose classes differ; this is the check behind that claim.
    """
    import tempfile
    from pathlib import Path

    from common.data.layouts import read_layout
    from common.phantom import make_phantoms
    from common.vqgan_transformer.transforms import roi_transforms

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        make_phantoms(Path(tmp) / "phantoms", n=n, layout="brats2023", seed=seed, shape=tuple(shape), workers=1,
                      progress=False)
        chain = roi_transforms(roi_size=roi_size)
        rois, labels = [], []
        for item in read_layout(Path(tmp) / "phantoms"):
            d = chain(item)
            rois.append(np.asarray(d["image"]))
            labels.append(int(d["class"]))
    out = {"n": n, "counts": {c: labels.count(i) for i, c in enumerate(CLASSES)}, "shape": list(shape),
           "roi_size": list(roi_size), "folds": folds, "statistics": statistic_separability(rois, labels, folds, seed)}
    if classifier:
        res = downstream_classification(rois, labels, folds=folds, pretrain_epochs=0, finetune_epochs=0,
                                        real_epochs=epochs, channels=channels, seed=seed, device=device,
                                        progress=False)
        out["classifier"] = res["summary"]["real_only"]
    return out


def compare_decoders(vqgan, transformer, real: Mapping[str, Sequence], count: int = 8, steps: int = 12,
                     guidance_scale: float = 1.0, seed: int = 0, batch_size: int = 4,
                     choice_temperature: float = 4.5) -> dict:
    """Raster against MaskGIT decoding of one trained model, side by side: network passes, seconds and MMD to
    the real ROIs per class (``real``: class name -> ROIs). The issue's goal: >= 30x fewer passes at equal or
    better MMD."""
    from common.metrics import image_mmd
    from common.vqgan_transformer.sampling import generate_rois

    out = {}
    for method in ("raster", "maskgit"):
        res = generate_rois(vqgan, transformer, "both", count, seeds=seed, method=method, steps=steps,
                            guidance_scale=guidance_scale, choice_temperature=choice_temperature,
                            batch_size=batch_size, progress=False)
        row = {"network_passes": res["network_passes"], "seconds": res["seconds"], "n_per_class": count}
        for cls in real:
            synth = [img for img, c in zip(res["images"], res["classes"]) if c == cls]
            row[f"mmd_{cls}"] = image_mmd([_volume(v) for v in real[cls]], [_volume(v) for v in synth],
                                          seed=seed)["value"]
        out[method] = row
    out["passes_ratio"] = out["raster"]["network_passes"] / out["maskgit"]["network_passes"]
    out["speedup"] = out["raster"]["seconds"] / max(out["maskgit"]["seconds"], 1e-9)
    return out


def _centroid_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-9
    z_train, z_test = (x_train - mu) / sd, (x_test - mu) / sd
    c0, c1 = z_train[y_train == 0].mean(0), z_train[y_train == 1].mean(0)
    d0, d1 = ((z_test - c0) ** 2).sum(1), ((z_test - c1) ** 2).sum(1)
    return 1.0 / (1.0 + np.exp(np.clip(d1 - d0, -50, 50)))  # closer to the HGG centroid -> higher


def class_adherence(real_rois: Sequence, real_labels: Sequence[int], generated_rois: Sequence,
                    requested_labels: Sequence[int], cnn_epochs: int = 0, channels: Sequence[int] = (8, 16, 32),
                    seed: int = 0, device="cpu") -> dict:
    """Does the model generate the class it was asked for? Classifiers trained on *real* ROIs only (the
    statistics' nearest centroid; with ``cnn_epochs`` > 0 also the downstream CNN) score the generated ROIs
    against the requested classes (chance = 0.5 accuracy / AUC)."""
    from common.metrics import classification_scores

    y_real = np.asarray([int(v) for v in real_labels])
    y_gen = [int(v) for v in requested_labels]
    if len(generated_rois) != len(y_gen) or len(generated_rois) == 0:
        raise ValueError(f"need one requested class per generated ROI, got {len(generated_rois)} and {len(y_gen)}")
    x_real = np.stack([roi_statistics(r) for r in real_rois])
    x_gen = np.stack([roi_statistics(r) for r in generated_rois])
    out = {"n_real": len(y_real), "n_generated": len(y_gen),
           "statistics": classification_scores(y_gen, _centroid_scores(x_real, y_real, x_gen))}
    if cnn_epochs > 0:
        torch.manual_seed(seed)
        net = build_roi_classifier(_volume(real_rois[0]).shape, channels)
        train_classifier(net, real_rois, y_real.tolist(), cnn_epochs, device=device, seed=seed)
        out["classifier"] = classification_scores(y_gen, predict_hgg(net, generated_rois, device))
    return out
