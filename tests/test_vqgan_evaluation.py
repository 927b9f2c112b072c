"""Evaluation pieces of the VQGAN + masked transformer bundle: per-class MMD / MS-SSIM, downstream classifier."""

from __future__ import annotations

import numpy as np
import pytest

from common.data.layouts import read_layout
from common.vqgan_transformer.evaluation import (
    downstream_classification,
    per_class_quality,
    phantom_grade_separability,
    roi_statistics,
    statistic_separability,
    stratified_folds,
)
from common.vqgan_transformer.transforms import roi_transforms


def blobs(n: int, bright: bool, rng: np.random.Generator, size: int = 16) -> list[np.ndarray]:
    """ROI-like volumes: background -1, a ball whose intensity depends on the class."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
    out = []
    for _ in range(n):
        centre = rng.uniform(6, 10, 3)[:, None, None, None]
        ball = np.sqrt(((grid - centre) ** 2).sum(0)) < rng.uniform(3, 5)
        v = np.full((size,) * 3, -1.0, np.float32)
        v[ball] = (0.6 if bright else -0.4) + 0.1 * rng.standard_normal(int(ball.sum()))
        out.append(v[None])
    return out


def test_per_class_quality_orders_close_and_far_sets():
    rng = np.random.default_rng(0)
    real = {"LGG": blobs(4, False, rng), "HGG": blobs(4, True, rng)}
    close = {"LGG": blobs(4, False, rng), "HGG": blobs(4, True, rng)}
    swapped = {"LGG": close["HGG"], "HGG": close["LGG"]}
    good, bad = per_class_quality(real, close), per_class_quality(real, swapped)
    for cls in ("LGG", "HGG"):
        assert good[cls]["mmd"]["value"] < bad[cls]["mmd"]["value"]
        assert good[cls]["n_real"] == 4 and good[cls]["n_synthetic"] == 4
        assert 0 < good[cls]["ms_ssim_synthetic"]["mean"] <= 1 and good[cls]["ms_ssim_real"]["n_pairs"] == 6
    with pytest.raises(ValueError, match="no real ones"):
        per_class_quality({"LGG": real["LGG"]}, close)


def test_stratified_folds():
    labels = [0] * 4 + [1] * 8
    folds = stratified_folds(labels, 4, seed=1)
    for k in range(4):
        members = [y for y, f in zip(labels, folds) if f == k]
        assert members.count(0) == 1 and members.count(1) == 2
    with pytest.raises(ValueError, match="at least 4 cases of each class"):
        stratified_folds([0, 0, 1, 1, 1, 1], 4)


def test_downstream_classifier_learns_a_separable_task(one_torch_thread):
    rng = np.random.default_rng(1)
    real = blobs(8, False, rng) + blobs(8, True, rng)
    labels = [0] * 8 + [1] * 8
    synth = blobs(8, False, rng) + blobs(8, True, rng)
    res = downstream_classification(real, labels, synth, labels, folds=2, pretrain_epochs=10, finetune_epochs=10,
                                    batch_size=4, channels=(4, 8), device="cpu", progress=False)
    assert set(res["summary"]) == {"real_only", "synthetic_pretrained_finetuned"}
    assert res["n_real"] == 16 and res["n_synthetic"] == 16 and len(res["per_fold"]["real_only"]) == 2
    for name in res["summary"]:
        assert res["summary"][name]["accuracy"]["mean"] >= 0.8
        assert set(res["summary"][name]) == {"auc", "f1", "accuracy", "precision", "recall"}


def test_downstream_classification_on_phantom_rois(phantom_root, one_torch_thread):
    chain = roi_transforms(roi_size=(16, 16, 16))
    rois, labels = [], []
    for item in read_layout(phantom_root):
        d = chain(item)
        rois.append(np.asarray(d["image"]))
        labels.append(int(d["class"]))
    synthetic = [np.flip(r, axis=1).copy() for r in rois]  # stand-ins for generated ROIs
    res = downstream_classification(rois, labels, synthetic, labels, folds=2, pretrain_epochs=1, finetune_epochs=1,
                                    real_train_fraction=1.0, channels=(4, 8), device="cpu", progress=False)
    for name, summary in res["summary"].items():
        for key, value in summary.items():
            assert value["n"] >= 1 and 0.0 <= value["mean"] <= 1.0, (name, key, value)
    assert res["n_real"] == len(rois) == 6


def test_statistic_separability_sees_a_dark_centre():
    rng = np.random.default_rng(2)
    homogeneous = blobs(8, True, rng)
    necrotic = []
    for v in blobs(8, True, rng):
        v = v.copy()
        inside = v > -1
        core = np.zeros_like(inside)
        core[0, 6:10, 6:10, 6:10] = True
        v[inside & core] = -0.6  # dark centre, still tumour
        necrotic.append(v)
    res = statistic_separability(homogeneous + necrotic, [0] * 8 + [1] * 8, folds=4)
    assert res["accuracy"]["mean"] >= 0.9 and res["features"][5] == "centre_minus_rim"
    stats = roi_statistics(necrotic[0])
    assert stats[5] < roi_statistics(homogeneous[0])[5]


@pytest.mark.slow
def test_phantom_grades_are_separable(tmp_path, one_torch_thread):
    """The check behind class conditioning: FLAIR ROIs of phantom HGG and LGG differ (dark necrotic centre,
    bright homogeneous non-enhancing tumour). 32 small phantoms, 4-fold CV of the simple statistics."""
    res = phantom_grade_separability(n=32, classifier=False, workdir=tmp_path)
    assert min(res["counts"].values()) >= 4
    assert res["statistics"]["accuracy"]["mean"] >= 0.75, res["statistics"]
    assert res["statistics"]["auc"]["mean"] >= 0.75, res["statistics"]


def test_compare_decoders_side_by_side(one_torch_thread):
    import torch

    from common.vqgan_transformer.evaluation import compare_decoders
    from common.vqgan_transformer.networks import ImportanceVQGAN, build_transformer, build_vqgan

    torch.manual_seed(0)
    vqgan = ImportanceVQGAN(build_vqgan(channels=(8, 8), num_res_layers=1, num_embeddings=16, embedding_dim=8),
                            head_channels=8).eval()
    transformer = build_transformer(16, (4, 4, 4), hidden_size=16, num_layers=1, num_heads=2, dropout=0.0).eval()
    rng = np.random.default_rng(0)
    real = {"LGG": blobs(3, False, rng), "HGG": blobs(3, True, rng)}
    res = compare_decoders(vqgan, transformer, real, count=2, steps=4)
    assert res["raster"]["network_passes"] == 64 and res["maskgit"]["network_passes"] == 4
    assert res["passes_ratio"] == 16 and res["speedup"] > 1
    assert res["maskgit"]["mmd_LGG"] >= 0 and "mmd_HGG" in res["raster"]


def test_class_adherence_scores_generated_rois_against_the_requested_class(one_torch_thread):
    from common.vqgan_transformer.evaluation import class_adherence

    rng = np.random.default_rng(3)
    real = blobs(6, False, rng) + blobs(6, True, rng)
    real_labels = [0] * 6 + [1] * 6
    generated = blobs(4, False, rng) + blobs(4, True, rng)
    good = class_adherence(real, real_labels, generated, [0] * 4 + [1] * 4, cnn_epochs=10, channels=(4, 8))
    bad = class_adherence(real, real_labels, generated, [1] * 4 + [0] * 4)  # a model ignoring the class
    assert good["statistics"]["accuracy"] == 1.0 and bad["statistics"]["accuracy"] == 0.0
    assert 0.0 <= good["classifier"]["accuracy"] <= 1.0 and good["n_generated"] == 8
    with pytest.raises(ValueError, match="one requested class"):
        class_adherence(real, real_labels, generated, [0])
