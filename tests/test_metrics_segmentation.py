"""Hand-computed Dice/HD95/ASSD/kappa/accuracy, BraTS regions, classification scores, conditioning fidelity."""

import numpy as np
import pytest
import torch

from common.metrics import classification_scores, segmentation
from common.metrics.segmentation import binary_scores, cohen_kappa, segmentation_scores


def test_dice_of_two_overlapping_cubes():
    gt = np.zeros((20, 20, 20), bool)
    gt[5:15, 5:15, 5:15] = True
    pred = np.zeros_like(gt)
    pred[7:17, 5:15, 5:15] = True  # overlap 8 x 10 x 10 = 800 of 1000 + 1000
    assert binary_scores(pred, gt)["dice"] == pytest.approx(0.8)


def test_parallel_planes_are_three_voxels_apart_everywhere():
    gt = np.zeros((10, 10, 12), bool)
    pred = np.zeros_like(gt)
    gt[:, :, 5] = True
    pred[:, :, 8] = True
    s = binary_scores(pred, gt)
    assert s["dice"] == 0 and s["hd95"] == pytest.approx(3.0) and s["assd"] == pytest.approx(3.0)
    s_mm = binary_scores(pred, gt, spacing=(1.0, 1.0, 2.5))
    assert s_mm["hd95"] == pytest.approx(7.5) and s_mm["assd"] == pytest.approx(7.5)


def test_hd95_and_assd_of_points():
    gt = np.zeros((12, 12, 12), bool)
    gt[5, 5, 5] = gt[5, 5, 9] = True
    pred = np.zeros_like(gt)
    pred[5, 5, 5] = True
    s = binary_scores(pred, gt)
    # pred->gt distances {0}; gt->pred {0, 4}: HD95 = max(0, 95th percentile of {0, 4} = 3.8)
    assert s["hd95"] == pytest.approx(3.8)
    # ASSD = mean of all surface distances of both directions = (0 + 0 + 4) / 3
    assert s["assd"] == pytest.approx(4 / 3)
    assert s["dice"] == pytest.approx(2 * 1 / 3)


def test_empty_structures_follow_the_brats_convention():
    empty = np.zeros((4, 5, 6), bool)
    full = empty.copy()
    full[1:3, 1:3, 1:3] = True
    assert binary_scores(empty, empty) == {"dice": 1.0, "hd95": 0.0, "assd": 0.0}
    missed = binary_scores(empty, full)
    assert missed["dice"] == 0 and missed["hd95"] == pytest.approx(np.sqrt(16 + 25 + 36))


def test_kappa_and_accuracy_by_hand():
    pred, truth = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    # p_o = 0.75, p_e = 0.5 * 0.25 + 0.5 * 0.75 = 0.5 -> kappa = 0.5
    assert cohen_kappa(pred, truth) == pytest.approx(0.5)
    assert segmentation_scores(pred, truth, regions=None)["accuracy"] == 0.75


def test_brats_regions_per_label_scheme():
    truth = np.zeros((16, 16, 16), np.uint8)
    truth[2:14, 2:14, 2:14] = 2  # SNFH
    truth[5:11, 5:11, 5:11] = 1  # NETC
    truth[7:9, 7:9, 7:9] = 3  # ET
    pred = truth.copy()
    pred[pred == 3] = 1  # enhancing tumor called necrosis
    s = segmentation_scores(pred, truth, regions="brats2023")
    assert s["per_region"]["ET"]["dice"] == 0
    assert s["per_region"]["TC"]["dice"] == pytest.approx(1) and s["per_region"]["WT"]["dice"] == pytest.approx(1)
    assert set(s["per_label"]) == {"1", "2", "3"} and s["per_label"]["2"]["dice"] == pytest.approx(1)
    assert segmentation.region_values("brats2019")["ET"] == (4,)
    assert segmentation.region_values("brats2024")["RC"] == (4,)


def test_classification_scores_by_hand():
    s = classification_scores([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.9])
    # predictions 0,1,1,1: TP 2, FP 1, TN 1, FN 0
    assert s["auc"] == pytest.approx(1.0)
    assert (s["accuracy"], s["recall"]) == (pytest.approx(0.75), pytest.approx(1.0))
    assert s["precision"] == pytest.approx(2 / 3) and s["f1"] == pytest.approx(0.8)
    assert classification_scores([0, 0, 1, 1], [0.8, 0.2, 0.7, 0.9])["auc"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="0 or 1"):
        classification_scores([0, 2], [0.1, 0.2])


class ThresholdSegmenter(torch.nn.Module):
    """Label 1 wherever the first channel is bright: a stand-in for a trained network."""

    def forward(self, x):
        bright = (x[:, :1] > 0.5).float()
        return torch.cat([1 - bright, bright], dim=1)


def test_conditioning_fidelity_scores_against_the_conditioning_mask():
    mask = np.zeros((12, 12, 12), np.uint8)
    mask[3:8, 3:8, 3:8] = 1
    image = np.stack([mask.astype(np.float32)] * 2)  # tumor bright in every channel
    shifted = np.roll(mask, 2, axis=0)
    res = segmentation.conditioning_fidelity(ThresholdSegmenter(), [image, image], [mask, shifted])
    assert res["n_cases"] == 2
    per_label = res["mean"]["per_label"]["1"]
    assert per_label["dice"] == pytest.approx((1.0 + 0.6) / 2)  # shifted by 2 of 5 voxels -> 3/5 overlap
    exact = segmentation.conditioning_fidelity(ThresholdSegmenter(), [image], [mask])
    assert exact["mean"]["per_region"]["WT"]["dice"] == pytest.approx(1.0)


def test_hd95_brats_convention_is_a_named_option():
    import surface_distance

    z, y, x = np.meshgrid(*[np.arange(32)] * 3, indexing="ij")
    gt = (x - 15) ** 2 + (y - 15) ** 2 + (z - 15) ** 2 < 64
    pred = (x - 17.3) ** 2 / 1.2 + (y - 15) ** 2 + (z - 14) ** 2 < 70
    spacing = (1.0, 1.0, 2.0)
    monai_style = binary_scores(pred, gt, spacing)
    brats = binary_scores(pred, gt, spacing, hd95_convention="brats")
    expected = surface_distance.compute_robust_hausdorff(surface_distance.compute_surface_distances(gt, pred, spacing), 95)
    assert brats["hd95"] == pytest.approx(expected)
    assert 0 < brats["hd95"] <= monai_style["hd95"] + 1e-6 and brats["hd95"] != pytest.approx(monai_style["hd95"])
    assert brats["dice"] == monai_style["dice"] and brats["assd"] == monai_style["assd"]
    label = gt.astype(np.int64)
    scores = segmentation_scores(pred.astype(np.int64), label, regions=None, spacing=spacing, hd95_convention="brats")
    assert scores["per_label"]["1"]["hd95"] == pytest.approx(expected)
    empty = binary_scores(np.zeros_like(gt), gt, spacing, hd95_convention="brats")
    assert empty["dice"] == 0 and empty["hd95"] > 60  # one side empty: the image diagonal, as before
    with pytest.raises(ValueError, match="hd95_convention"):
        binary_scores(pred, gt, hd95_convention="medpy")


def test_precision_with_no_positive_prediction_is_the_stated_zero_division():
    s = classification_scores([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4])  # nothing predicted positive
    assert s["precision"] == 0.0 and s["zero_division_used"] == ["precision"] and s["n_predicted_positive"] == 0
    assert s["recall"] == 0.0 and s["accuracy"] == 0.5
    nan = classification_scores([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], zero_division=float("nan"))
    assert np.isnan(nan["precision"])
    none_positive = classification_scores([0, 0, 0], [0.1, 0.2, 0.9])
    assert none_positive["recall"] == 0.0 and "recall" in none_positive["zero_division_used"]
    assert classification_scores([0, 0, 1, 1], [0.1, 0.6, 0.7, 0.9])["zero_division_used"] == []
